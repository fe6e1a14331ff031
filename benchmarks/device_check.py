"""One-command device validation: every GPU path in one short run, with one file of results.

GPU time comes in short slots, so this script does everything in one run of at most about 8 minutes on
one H100-class GPU and writes ``device_check.json`` (``--out``) after every step, plus a table at the end:

1. ``cuda_tests``: the tests marked ``cuda`` (``pytest -m cuda``, a subprocess): the CPU/GPU bit-identity
   of the DARE/DELLA masks, engine merges, evaluation, search, data-aware methods and the analysis on cuda.
2. ``models``: a random **Llama-2-7B-shaped** fp16 model (vocabulary 32000, hidden 4096, 32 layers,
   intermediate 11008, 32 heads) written into a temporary folder shard by shard with safetensors (never
   the whole model in memory; random values drawn on the device), the tiny models' tokenizer
   (``llm_merging.model.tiny.build_tokenizer``, 1024 tokens: ids above it are never inputs and decode
   to nothing), two rank-16 ``q_proj``/``v_proj`` LoRA experts and one full fine-tune (base + noise).
   Also a *subset* checkpoint: the embeddings, the first ``SUBSET_LAYERS`` layers, the final norm and
   the LM head, the same tensors bit for bit, plus a second full fine-tune of the subset only.
3. ``merges``: seconds (load + merge, and the engine's math alone), peak GPU and host memory of
   ``task_arithmetic``, ``ties_merge``, ``dare_ties`` (the two LoRA experts) and ``ties_merge`` (full
   fine-tune + LoRA) on the device, in float16 as a GPU run keeps an fp16 checkpoint.
4. ``cpu_equality``: the same merges of the subset tensors in a child process that sees no GPU (so the
   engine's math runs on the CPU), against the device merges of those tensors: bit-identical or the
   largest difference. Added: ``ties_merge`` and ``dare_ties`` of the two full fine-tunes of the subset,
   which docs/methods.md promises to be the same model on any device (counter-hash masks, exact
   thresholds). A LoRA expert's ΔW = s·B·A is a matmul, rounded by each device's BLAS its own way, so
   merges with LoRA experts are expected close, not bit-identical.
5. ``evaluation``: the kit's CosmosQA and XSum rows (``--data-dir``) on the last merged model:
   examples/s with ``--batch-size auto`` against batch size 1, whether the predictions (choices,
   texts and generated token ids) are identical, and the projected time of the full validation files.
6. ``search``: one search trial in memory (``llm_merging.search.candidates.InMemoryMerger``: merge in
   place, score, undo) against the disk round trip (merge → save → reload → score), as
   ``benchmarks/search_speed.py`` measures, and whether both give the same scores.
7. ``processes``: with ``--processes N`` and N GPUs, the data-parallel evaluation (``accelerate launch
   --multi_gpu --num_processes N llm_merging/main.py ...``) against one process with the same batch
   size: the predictions files must be byte for byte the same. Otherwise recorded as skipped.

``--budget S`` (default 420) stops early: steps that would start after S seconds are skipped and
recorded as such, and the running step stops at its next check (between tensors, batches or merges).
Without a GPU the script prints one line and exits 0, unless ``--device cpu --shape tiny`` is given: then
the same steps run on a tiny model on the CPU (in under a minute; ``pytest -m cuda`` is skipped there).
Temporary folders are removed on exit, also on failure or SIGTERM. Exit status: 0 when no step failed
(skipped steps included), 1 when one did, 2 for a bad option. ::

    python benchmarks/device_check.py                                  # on a GPU machine
    python benchmarks/device_check.py --budget 240 --skip search       # a shorter slot
    python benchmarks/device_check.py --processes 2                    # also two GPUs against one
    python benchmarks/device_check.py --device cpu --shape tiny --out /tmp/dc.json   # the CPU form
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # no network, ever
    os.environ[_key] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from llm_merging.core.budget import Budget
from llm_merging.core.errors import first_line

logger = logging.getLogger("device_check")

#: model shapes: Llama-2-7B's, and a tiny one for the CPU form (vocab None: the tokenizer's)
SHAPES = {
    "llama-7b": {"vocab": 32000, "hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "kv_heads": 32},
    "tiny": {"vocab": None, "hidden": 64, "layers": 4, "intermediate": 128, "heads": 4, "kv_heads": 4},
}
#: per shape: evaluation rows per file, search rows per file, tokens generated in the evaluation (None: the
#: method's, 64) and in the search trial, search trials (the first warms up the GPU's kernels)
SIZES = {"llama-7b": {"eval_rows": 24, "search_rows": 8, "gen_len": None, "search_gen_len": 16, "trials": 2},
         "tiny": {"eval_rows": 4, "search_rows": 2, "gen_len": 8, "search_gen_len": 8, "trials": 2}}
STEPS = ("cuda_tests", "models", "merges", "cpu_equality", "evaluation", "search", "processes")
SUBSET_LAYERS = 2
LORA_RANK, LORA_ALPHA, LORA_MODULES = 16, 32, ("q_proj", "v_proj")
WEIGHT_STD, FULL_NOISE, LORA_STD = 0.02, 0.002, 0.01
SEED = 0
DENSITY = "0.5"
#: label -> (method, experts, --set values) merged on the whole model on the device
MERGES = {
    "task_arithmetic (2 LoRA)": ("task_arithmetic", ("lora-0", "lora-1"), {}),
    "ties_merge (2 LoRA)": ("ties_merge", ("lora-0", "lora-1"), {"density": DENSITY}),
    "dare_ties (2 LoRA)": ("dare_ties", ("lora-0", "lora-1"), {"density": DENSITY}),
    "ties_merge (full + LoRA)": ("ties_merge", ("full-0", "lora-0"), {"density": DENSITY}),
}
#: merged on the subset only, where docs/methods.md promises the same model on any device
PROMISED = {
    "ties_merge (2 full, subset)": ("ties_merge", ("full-0", "full-1"), {"density": DENSITY}),
    "dare_ties (2 full, subset)": ("dare_ties", ("full-0", "full-1"), {"density": DENSITY}),
}
SEARCH_METHOD = ("ties_merge", ("lora-0", "lora-1"), {"density": DENSITY})
#: seconds a 7B disk round trip needs at least (load, merge, save 13 GB, reload, score): not started with less
ROUND_TRIP_MIN_S = {"llama-7b": 90, "tiny": 0}
CLOSE_FRACTION = 1e-4  # "close": at most this fraction of the entries differ
FILES = {"cosmos_qa": "cosmos_qa.json", "xsum": "xsum.json"}


class Skip(Exception):
    """A step that cannot run here (its reason is recorded)."""


# ------------------------------------------------------------------------------------------- helpers
class Peaks:
    """Peak host memory (RSS of this process, sampled every 20 ms) and peak GPU memory over a block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.host_mib = 0.0
        self.gpu_mib: float | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.host_mib = max(self.host_mib, proc.memory_info().rss / 2**20)
            if self._stop.wait(0.02):
                return

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.gpu_mib = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        self._stop.set()
        self._thread.join()
        self.host_mib = round(self.host_mib, 1)

    def as_dict(self) -> dict:
        return {"peak_host_mib": self.host_mib, **({"peak_gpu_mib": self.gpu_mib} if self.cuda else {})}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dir_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 3)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bit patterns as integers (so -0.0 and 0.0 differ, as the bits do)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def in_subset(name: str) -> bool:
    """The subset compared with the CPU: every tensor outside the layers, and the first layers."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return m is None or int(m.group(1)) < SUBSET_LAYERS


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's summary line ('3 passed, 1 skipped, 700 deselected in 9.12s')."""
    words = r"(passed|failed|skipped|deselected|errors?|xfailed|xpassed)"
    lines = [line for line in output.strip().splitlines() if re.search(r"\d+ " + words, line)]
    counts: dict[str, int] = {}
    for n, word in re.findall(r"(\d+) " + words, lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


# -------------------------------------------------------------------------------------------- models
def llama_config(dims: dict, vocab: int, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=dims["hidden"], intermediate_size=dims["intermediate"],
                       num_hidden_layers=layers or dims["layers"], num_attention_heads=dims["heads"],
                       num_key_value_heads=dims["kv_heads"], max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False, dtype="float16")


def param_groups(config) -> list[list[tuple[str, tuple]]]:
    """The parameters' names and shapes (from a model on the meta device), one group per layer plus one
    for the rest: a group is one safetensors shard."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.", name)
        groups.setdefault(m.group(1) if m else "rest", []).append((name, tuple(p.shape)))
    return list(groups.values())


class ShardedWriter:
    """A model directory written one shard at a time (safetensors), then its index, config and tokenizer."""

    def __init__(self, out: Path, n_shards: int) -> None:
        self.out, self.n, self.k = out, n_shards, 0
        self.weight_map: dict[str, str] = {}
        self.total = 0
        out.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.k += 1
        fname = f"model-{self.k:05d}-of-{self.n:05d}.safetensors"
        save_file(tensors, str(self.out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            self.weight_map[name] = fname
            self.total += t.numel() * t.element_size()

    def close(self, config, tokenizer_dir: Path) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        config.save_pretrained(str(self.out))
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, self.out / f.name)


def write_lora(out: Path, base: Path, shapes: dict[str, tuple], layers: int, seed: int, device: str) -> None:
    """A PEFT LoRA adapter (rank LORA_RANK on q_proj/v_proj of ``layers`` layers) with random A and B."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in LORA_MODULES:
            rows, cols = shapes[f"model.layers.{layer}.self_attn.{module}.weight"]
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = torch.randn(LORA_RANK, cols, generator=gen, device=device) * LORA_STD
            b = torch.randn(rows, LORA_RANK, generator=gen, device=device) * LORA_STD
            tensors[f"{key}.lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.cpu().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
              "target_modules": list(LORA_MODULES), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": str(base)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_models(root: Path, shape: str, device: str, deadline: Budget, progress: bool) -> dict:
    """Write the base, its full fine-tune and two LoRA experts, and their subset twins, under ``root``."""
    from tqdm.auto import tqdm

    from llm_merging.core.errors import BudgetExceeded
    from llm_merging.model.tiny import build_tokenizer

    dims = SHAPES[shape]
    tok_dir = root / "tokenizer"
    tok = build_tokenizer(tok_dir)
    vocab = dims["vocab"] or len(tok)
    config, sub_config = llama_config(dims, vocab), llama_config(dims, vocab, SUBSET_LAYERS)
    groups = param_groups(config)
    shapes = {n: s for g in groups for n, s in g}
    sub_groups = [g for g in groups if all(in_subset(n) for n, _ in g)]
    full = {k: ShardedWriter(root / k, len(groups)) for k in ("base", "full-0")}
    sub = {k: ShardedWriter(root / "subset" / k, len(sub_groups)) for k in ("base", "full-0", "full-1")}
    gen_device = device if device.startswith("cuda") else "cpu"
    for group in tqdm(groups, desc="write models", unit="shard", disable=not progress):
        if deadline.expired():
            raise BudgetExceeded("the budget ran out while writing the models")
        out: dict[str, dict[str, torch.Tensor]] = {"base": {}, "full-0": {}, "full-1": {}}
        subset = all(in_subset(n) for n, _ in group)
        for name, shp in group:
            gen = torch.Generator(gen_device).manual_seed(zlib.crc32(name.encode()))
            if name.endswith("norm.weight"):
                base = torch.ones(shp, device=gen_device)
            else:
                base = torch.randn(shp, generator=gen, device=gen_device).mul_(WEIGHT_STD)
            out["base"][name] = base.half().cpu()
            for k in ("full-0", "full-1") if subset else ("full-0",):
                noise = torch.randn(shp, generator=gen, device=gen_device).mul_(FULL_NOISE)
                out[k][name] = noise.add_(base).half().cpu()
            del base
        for k in ("base", "full-0"):
            full[k].add(out[k])
        if subset:
            for k, writer in sub.items():
                writer.add(out[k])
        del out
    for w in full.values():
        w.close(config, tok_dir)
    for w in sub.values():
        w.close(sub_config, tok_dir)
    for i in range(2):
        write_lora(root / f"lora-{i}", root / "base", shapes, dims["layers"], 100 + i, gen_device)
        write_lora(root / "subset" / f"lora-{i}", root / "subset" / "base", shapes, SUBSET_LAYERS, 100 + i, gen_device)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"shape": shape, **{k: v for k, v in dims.items() if k != "vocab"}, "vocab": vocab,
            "parameters": n_params, "fp16_gib": round(2 * n_params / 2**30, 2),
            "written_gib": dir_gib(root), "experts": ["lora-0", "lora-1", "full-0"],
            "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "modules": list(LORA_MODULES)},
            "tokenizer": f"llm_merging.model.tiny.build_tokenizer ({len(tok)} tokens)",
            "subset": {"layers": SUBSET_LAYERS, "tensors": sum(len(g) for g in sub_groups),
                       "what": f"embed_tokens, layers 0-{SUBSET_LAYERS - 1}, norm, lm_head",
                       "experts": ["lora-0", "lora-1", "full-0", "full-1 (subset only)"]}}


# ------------------------------------------------------------------------------------------- merging
def dtype_for(device: str) -> str:
    """What a run's ``--dtype auto`` keeps the fp16 checkpoint in: float16 on a GPU, float32 on the CPU."""
    return "float16" if device.startswith("cuda") else "float32"


def make_method(name: str, base: Path, experts: list[Path], device: str, overrides: dict, *,
                dtype: str | None = None, progress: bool = False, preflight: bool = True):
    """A merge method configured as a run configures it (``llm_merging.merging.factory``)."""
    from llm_merging.merging.factory import MethodOptions, configure, instantiate

    method = instantiate(name)
    configure(method, MethodOptions(base_model=str(base), models=[str(e) for e in experts], device=device,
                                    dtype=dtype or dtype_for(device), seed=SEED, progress=progress,
                                    overrides=dict(overrides)))
    if preflight:
        method.preflight()
    return method


def touched_tensors(method, keep: Callable[[str], bool] = lambda n: True) -> dict[str, torch.Tensor]:
    """The merged values (CPU copies) of the parameters the experts change, those ``keep`` accepts."""
    touched = set().union(*(set(e.param_names()) for e in method.experts))
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in method.base_model.named_parameters()
            if n in touched and keep(n)}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def child_cpu_merges(spec_file: str) -> int:
    """The CPU side of ``cpu_equality`` (a child process without GPUs): merge, save the touched tensors."""
    from safetensors.torch import save_file

    if torch.cuda.is_available():
        raise SystemExit("the CPU merges must run where no GPU is visible")
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    for item in spec["merges"]:
        with Peaks("cpu") as peaks:
            t0 = time.perf_counter()
            method = make_method(item["method"], Path(item["base"]), [Path(e) for e in item["experts"]], "cpu",
                                 item["overrides"], dtype=spec["dtype"])
            method.merge()
            seconds = time.perf_counter() - t0
        save_file(touched_tensors(method), str(Path(spec["out"]) / f"{slug(item['label'])}.safetensors"))
        result = {"seconds": round(seconds, 3), "math_device": method.merge_stats.get("math_device"), **peaks.as_dict()}
        print(json.dumps({item["label"]: result}), flush=True)  # one line per merge: a timeout keeps the finished
        del method
        gc.collect()
    return 0


def compare(device_side: dict[str, torch.Tensor], cpu_side: dict[str, torch.Tensor]) -> dict:
    """Bit identity, the largest difference and the fraction of differing entries of two sets of tensors."""
    if set(device_side) != set(cpu_side):
        return {"identical": False, "error": f"tensor names differ: {sorted(set(device_side) ^ set(cpu_side))[:3]}"}
    identical, worst, differ, total = True, 0.0, 0, 0
    for name in sorted(device_side):
        a, b = device_side[name], cpu_side[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"identical": False, "error": f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"}
        same = bits(a) == bits(b)
        identical = identical and bool(same.all())
        differ += int((~same).sum())
        total += a.numel()
        worst = max(worst, float((a.float() - b.float()).abs().nan_to_num(float("inf")).max()) if a.numel() else 0.0)
    return {"identical": identical, "max_abs_diff": worst, "differ_fraction": differ / max(total, 1),
            "tensors": len(device_side), "values": total}


# ------------------------------------------------------------------------------------------ the steps
class Check:
    """The run: options, where the models are, the results document, written after every step."""

    def __init__(self, args, work: Path, deadline: Budget) -> None:
        self.args, self.work, self.deadline = args, work, deadline
        self.device = args.device
        self.progress = not args.quiet
        self.models: Path | None = None
        self.last_merged = None  # the last device merge's method, kept for the evaluation
        self.device_subset: dict[str, dict[str, torch.Tensor]] = {}
        self.doc: dict[str, Any] = {"schema": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                    "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "device": device_info(args),
                                    "shape": args.shape, "budget_s": args.budget, "status": "running",
                                    "steps": {}}

    def write(self) -> None:
        from llm_merging.core.io import atomic_write_json

        atomic_write_json(self.args.out, self.doc)

    def run(self) -> int:
        t0 = time.perf_counter()
        for step in STEPS:
            entry = self.doc["steps"][step] = {"status": "running"}
            start = time.perf_counter()
            try:
                if step in self.args.skip:
                    raise Skip("--skip")
                if self.deadline.expired():
                    raise Skip(f"budget spent (--budget {self.args.budget:g})")
                logger.info("step %s ...", step)
                entry.update(getattr(self, f"step_{step}")() or {})
                if entry["status"] == "running":
                    entry["status"] = "ok"
            except Skip as why:
                entry.update(status="skipped", reason=str(why))
                logger.info("step %s skipped: %s", step, why)
            except Exception as exc:  # noqa: BLE001 - one step failing does not stop the others
                entry.update(self.failure(exc))
            entry["seconds"] = round(time.perf_counter() - start, 2)
            self.doc["seconds"] = round(time.perf_counter() - t0, 2)
            self.write()
        steps = self.doc["steps"].values()
        failed = any(s["status"] == "failed" for s in steps)
        cut = any(s["status"] == "partial" or s.get("reason", "").startswith("budget") for s in steps)
        self.doc["status"] = "failed" if failed else "partial" if cut else "ok"
        self.write()
        return 1 if failed else 0

    def failure(self, exc: Exception) -> dict:
        """A step's (or one merge's) exception as its entry: skipped when the budget ran out, else failed."""
        from llm_merging.core.errors import BudgetExceeded

        if isinstance(exc, BudgetExceeded):
            return {"status": "skipped", "reason": f"budget spent (--budget {self.args.budget:g}): {first_line(exc)}"}
        error = f"{type(exc).__name__}: {first_line(exc)}"
        logger.error("%s", error)
        if self.args.debug:
            logger.exception("traceback")
        return {"status": "failed", "error": error}

    def need(self, step: str) -> None:
        if self.doc["steps"].get(step, {}).get("status") != "ok":
            raise Skip(f"needs the {step} step")

    # ------------------------------------------------------------------------- 1. pytest -m cuda
    def step_cuda_tests(self) -> dict:
        if not self.device.startswith("cuda"):
            raise Skip("--device cpu: the CUDA tests need a GPU (they would all be skipped)")
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", str(REPO / "tests")]
        timeout = max(min(self.deadline.remaining(), 180.0), 1.0)
        try:
            proc = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"pytest -m cuda did not finish within {timeout:.0f} s"}
        out = proc.stdout + proc.stderr
        counts = pytest_counts(out)
        entry: dict[str, Any] = {"command": "pytest -m cuda -q tests", "returncode": proc.returncode, "counts": counts,
                                 "failed_tests": [line.split(" ", 1)[1].split(" - ")[0] for line in out.splitlines()
                                                  if line.startswith(("FAILED ", "ERROR "))],
                                 "skipped_reasons": [line for line in out.splitlines() if line.startswith("SKIPPED")]}
        if proc.returncode not in (0, 5):  # 5: no test selected
            entry.update(status="failed", error=f"pytest -m cuda exited {proc.returncode}",
                         output_tail=out.strip().splitlines()[-15:])
        return entry

    # ------------------------------------------------------------------------- 2. the models
    def step_models(self) -> dict:
        root = self.work / "models"
        n = SHAPES[self.args.shape]
        params = 2 * (n["vocab"] or 1024) * n["hidden"] + n["layers"] * (4 * n["hidden"] ** 2 + 3 * n["hidden"] * n["intermediate"])
        need = 2 * params * (2 + 3 * (SUBSET_LAYERS + 2) / (n["layers"] + 2)) * 1.1  # base, full, 3 subsets
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise RuntimeError(f"the models need about {need / 2**30:.0f} GiB in {self.work}, "
                               f"{free / 2**30:.0f} GiB free (pass --work-dir)")
        with Peaks(self.device) as peaks:
            info = build_models(root, self.args.shape, self.device, self.deadline, self.progress)
        self.models = root
        return {**info, **peaks.as_dict()}

    def path(self, key: str, subset: bool = False) -> Path:
        return self.models / "subset" / key if subset else self.models / key

    # ------------------------------------------------------------------------- 3. merges on the device
    def device_merge(self, label: str, spec, subset: bool) -> tuple[dict, Any]:
        name, experts, overrides = spec
        with Peaks(self.device) as peaks:
            t0 = time.perf_counter()
            method = make_method(name, self.path("base", subset), [self.path(e, subset) for e in experts], self.device,
                                 overrides, progress=self.progress)
            method.should_stop = self.deadline.expired
            method.merge()
            sync(self.device)
            seconds = time.perf_counter() - t0
        self.device_subset[label] = touched_tensors(method, in_subset)
        stats = method.merge_stats
        return {"method": name, "experts": list(experts), "values": dict(overrides), "seconds": round(seconds, 3),
                "load_seconds": round(method.load_seconds, 3), "merge_seconds": stats.get("seconds"),
                "math_device": stats.get("math_device"), "tensors_merged": stats.get("tensors_merged"),
                "values_merged": stats.get("values_merged"), **peaks.as_dict()}, method

    def step_merges(self) -> dict:
        self.need("models")
        results = {}
        for label, spec in MERGES.items():
            if self.deadline.expired():
                results[label] = {"status": "skipped", "reason": f"budget spent (--budget {self.args.budget:g})"}
                continue
            self.last_merged = None
            free_device_memory()
            try:
                results[label], self.last_merged = self.device_merge(label, spec, subset=False)
            except Exception as exc:  # noqa: BLE001 - the other merges still run
                results[label] = self.failure(exc)
                continue
            logger.info("%s: %.1f s (math %.1f s)", label, results[label]["seconds"], results[label]["merge_seconds"])
        entry = {"device": self.device, "dtype": dtype_for(self.device), "results": results}
        bad = [k for k, r in results.items() if r.get("status") == "failed"]
        if bad:
            entry.update(status="failed", error=f"merges failed: {', '.join(bad)}")
        elif any(r.get("status") == "skipped" for r in results.values()):
            entry["status"] = "partial"
        return entry

    # ------------------------------------------------------------------------- 4. the same merges on the CPU
    def step_cpu_equality(self) -> dict:
        self.need("models")
        from safetensors.torch import load_file

        results: dict[str, dict] = {}
        for label, spec in PROMISED.items():  # the device side of the subset-only merges
            results[label], method = self.device_merge(label, spec, subset=True)
            del method
        free_device_memory()
        lora_only = {k: v for k, v in MERGES.items() if k in self.device_subset and all(e.startswith("lora") for e in v[1])}
        todo = {**lora_only, **PROMISED, **{k: v for k, v in MERGES.items() if k in self.device_subset}}  # cheap first
        out = self.work / "cpu-merges"
        out.mkdir(exist_ok=True)
        spec = {"out": str(out), "dtype": dtype_for(self.device), "merges": [
            {"label": label, "method": m, "base": str(self.path("base", True)),
             "experts": [str(self.path(e, True)) for e in experts], "overrides": values}
            for label, (m, experts, values) in todo.items()]}
        (self.work / "cpu-merges.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-cpu-merges", str(self.work / "cpu-merges.json")]
        timeout = max(self.deadline.remaining(), 1.0)
        stopped = None
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO),
                                  check=False)
            stdout = proc.stdout
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"the CPU merges failed: {tail}")
        except subprocess.TimeoutExpired as exc:  # keep the merges that finished
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            stopped = f"budget spent (--budget {self.args.budget:g}) during the CPU merges"
        cpu = {}
        for line in stdout.splitlines():
            with contextlib.suppress(ValueError):
                cpu.update(json.loads(line))
        table = {}
        for label in todo:
            if label not in cpu:
                table[label] = {"status": "skipped", "reason": stopped or "not merged on the CPU"}
                continue
            row = compare(self.device_subset[label], load_file(str(out / f"{slug(label)}.safetensors")))
            lora = any(e.startswith("lora") for e in todo[label][1])
            row["expected"] = "close (ΔW = s·B·A is a matmul)" if lora else "bit-identical (docs/methods.md)"
            if "error" in row:
                row["verdict"] = "MISMATCH"
            elif row["identical"]:
                row["verdict"] = "bit-identical"
            elif lora and row["differ_fraction"] <= CLOSE_FRACTION:
                row["verdict"] = "close"
            else:
                row["verdict"] = "MISMATCH"
            row["cpu"] = cpu[label]
            if label in results:
                row["device"] = results[label]
            table[label] = row
        self.device_subset.clear()
        bad = [k for k, r in table.items() if r.get("verdict") == "MISMATCH"]
        entry = {"compared": f"the subset: {SUBSET_LAYERS} first layers, embeddings, final norm and LM head",
                 "cpu_process": "a child process with CUDA_VISIBLE_DEVICES='' (the engine's math on the CPU)",
                 "results": table}
        if bad:
            entry.update(status="failed", error=f"CPU and device merges differ beyond expectation: {', '.join(bad)}")
        elif stopped:
            entry.update(status="partial", reason=stopped)
        shutil.rmtree(out, ignore_errors=True)
        return entry

    # ------------------------------------------------------------------------- 5. evaluation
    def data_files(self) -> tuple[dict[str, Path], dict[str, Path], str]:
        """The rows' files, the full validation files to project, and where they came from."""
        from llm_merging.model import tiny

        data = Path(self.args.data_dir)
        if all((data / f).is_file() for f in FILES.values()):
            files = {k: data / f for k, f in FILES.items()}
            val = {k: data / "validation" / f"{k}.csv" for k in FILES}
            full = val if all(p.is_file() for p in val.values()) else files
            return files, full, str(data)
        samples = {Path(p).stem.replace("_sample", ""): Path(p) for p in tiny.sample_data_files()}
        files = {k: samples[k] for k in FILES}
        logger.warning("kit data not found in %s: using the package's sample rows", data)
        return files, files, "the package's sample data (kit data not found)"

    def loaded_model(self):
        """The last merged model, else the base loaded on the device."""
        method, self.last_merged = self.last_merged, None
        if method is None:
            method = make_method("task_arithmetic", self.path("base"), [self.path("lora-0")], self.device, {},
                                 preflight=False)
            method._load_base_model()
            method._load_tokenizer()
        return method

    def step_evaluation(self) -> dict:
        self.need("models")
        from llm_merging.data import load_examples
        from llm_merging.evaluation import evaluate_dataset

        files, full, source = self.data_files()
        rows_n = self.args.eval_rows or SIZES[self.args.shape]["eval_rows"]
        method = self.loaded_model()
        if SIZES[self.args.shape]["gen_len"]:
            method.max_gen_len = SIZES[self.args.shape]["gen_len"]
        gen_len = method.max_gen_len
        results = {}
        fast = slow = None
        try:
            for name, path in files.items():
                rows = load_examples(path, max_examples=rows_n)
                evaluate_dataset(method, rows[:2], batch_size=2, progress=False)  # warm-up: kernels, allocator
                fast, slow = Recorder(method), Recorder(method)
                sides = {}
                for side, rec, size in (("auto", fast, None), ("batch_1", slow, 1)):
                    sync(self.device)
                    t0 = time.perf_counter()
                    preds, partial, used = evaluate_dataset(rec, rows, batch_size=size, budget=self.deadline,
                                                            progress=self.progress, desc=f"{name} {side}")
                    sync(self.device)
                    seconds = time.perf_counter() - t0
                    sides[side] = {"seconds": round(seconds, 3), "examples": len(preds), "partial": partial,
                                   "batch_size": used, "examples_per_s": round(len(preds) / seconds, 3) if preds else None,
                                   "preds": preds}
                a, b = sides["auto"].pop("preds"), sides["batch_1"].pop("preds")
                common = sorted(set(a) & set(b))
                same = sum(a[i]["prediction"] == b[i]["prediction"] for i in common)
                diffs = [abs(x - y) for i in common for x, y in zip(a[i].get("answer_choices_scores", []),
                                                                      b[i].get("answer_choices_scores", []))
                         if x is not None and y is not None]
                ids_same = [fast.ids[k] == slow.ids[k] for k in fast.ids if k in slow.ids]
                n_full = len(load_examples(full[name]))
                rate = sides["auto"]["examples_per_s"]
                results[name] = {
                    "file": str(path), "eval_type": rows[0]["eval_type"] if rows else None, "rows": len(rows), **sides,
                    "speedup": round(sides["batch_1"]["seconds"] / sides["auto"]["seconds"], 3)
                    if sides["auto"]["examples"] == sides["batch_1"]["examples"] == len(rows) else None,
                    "same_predictions": f"{same}/{len(common)}", "identical": same == len(common) == len(rows)
                    and all(ids_same),
                    "max_abs_score_diff": max(diffs) if diffs else None,
                    "generated_ids_same": f"{sum(ids_same)}/{len(ids_same)}" if ids_same else None,
                    "full_validation": {"file": str(full[name]), "rows": n_full,
                                        "projected_s": round(n_full / rate, 3) if rate else None}}
                logger.info("%s: auto %s ex/s, batch 1 %s ex/s", name, rate, sides["batch_1"]["examples_per_s"])
        finally:
            method = fast = slow = None  # the model's last references
            free_device_memory()
        projected = [r["full_validation"]["projected_s"] for r in results.values()]
        return {"data": source, "max_gen_len": gen_len, "datasets": results,
                "projected_full_validation_s": round(sum(projected), 3) if None not in projected else None,
                **({"status": "partial"} if any(r["auto"]["partial"] or r["batch_1"]["partial"]
                                                 for r in results.values()) else {})}

    # ------------------------------------------------------------------------- 6. a search trial
    def step_search(self) -> dict:
        self.need("models")
        from llm_merging.data import load_examples
        from llm_merging.evaluation import unique_names
        from llm_merging.model.save import save_full
        from llm_merging.search.candidates import Fitness, InMemoryMerger

        for key in ("full-0", "subset"):  # no later step reads them: room for the round trip's save
            shutil.rmtree(self.path(key), ignore_errors=True)
        name, experts, values = SEARCH_METHOD
        base, paths = self.path("base"), [self.path(e) for e in experts]
        files, _, _ = self.data_files()
        n = self.args.search_rows or SIZES[self.args.shape]["search_rows"]
        rows = [[r for r in load_examples(f) if "label" in r or r.get("target")][:n] for f in files.values()]
        fitness = Fitness(unique_names([str(f) for f in files.values()]), rows, [len(r) for r in rows])
        gen_len = SIZES[self.args.shape]["search_gen_len"]

        with Peaks(self.device) as mem_peaks:  # in memory: what --search does per trial
            method = make_method(name, base, paths, self.device, values)
            method.max_gen_len = gen_len
            t0 = time.perf_counter()
            merger = InMemoryMerger(method, progress=False)
            setup = time.perf_counter() - t0
            merger.share_with(method)
            method.check_all_tensors(merger.names)
            trials = []
            for _ in range(SIZES[self.args.shape]["trials"]):
                sync(self.device)
                t0 = time.perf_counter()
                merge_s = merger.apply(method.merge_resolved)
                sync(self.device)
                t1 = time.perf_counter()
                mem_scores = fitness.evaluate(method, remaining=self.deadline.remaining)
                sync(self.device)
                t2 = time.perf_counter()
                merger.restore()
                trials.append({"merge": round(merge_s, 3), "score": round(t2 - t1, 3),
                               "total": round(time.perf_counter() - t0, 3)})
            merger.release()
            del method, merger
            free_device_memory()
        in_memory = {"setup_s": round(setup, 3), "trial": trials[-1], "first_trial": trials[0],
                     "scores": mem_scores["scores"], **mem_peaks.as_dict()}
        if self.deadline.remaining() < ROUND_TRIP_MIN_S[self.args.shape]:
            why = f"budget: {max(self.deadline.remaining(), 0):.0f} s left, the round trip needs about " \
                  f"{ROUND_TRIP_MIN_S[self.args.shape]} s"
            return {"status": "partial", "in_memory": in_memory, "disk_round_trip": {"status": "skipped", "reason": why}}
        from llm_merging.core.errors import BudgetExceeded

        steps = {}
        out = self.work / "candidate"
        with Peaks(self.device) as disk_peaks:
            t0 = time.perf_counter()
            method = make_method(name, base, paths, self.device, values)
            method.should_stop = self.deadline.expired
            try:
                method.merge()
            except BudgetExceeded as exc:  # keep the in-memory figures
                return {"status": "partial", "in_memory": in_memory,
                        "disk_round_trip": {"status": "skipped", "reason": f"budget spent: {first_line(exc)}"}}
            sync(self.device)
            steps["merge"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            save_full(method.base_model, method.input_tokenizer, out, {"method": name})
            steps["save"] = time.perf_counter() - t0
            del method
            free_device_memory()
            t0 = time.perf_counter()
            evaluator = make_method(name, out, paths, self.device, values, preflight=False)
            evaluator._load_base_model()  # from the saved directory, in the dtype it was saved in
            evaluator._load_tokenizer()
            evaluator.max_gen_len = gen_len
            sync(self.device)
            steps["reload"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            disk_scores = fitness.evaluate(evaluator, remaining=self.deadline.remaining)
            sync(self.device)
            steps["score"] = time.perf_counter() - t0
            del evaluator
            free_device_memory()
        shutil.rmtree(out, ignore_errors=True)
        total = sum(steps.values())
        return {"method": name, "experts": list(experts), "values": values, "max_gen_len": gen_len,
                "rows": {k: len(r) for k, r in zip(fitness.names, rows)}, "in_memory": in_memory,
                "disk_round_trip": {**{k: round(v, 3) for k, v in steps.items()}, "total": round(total, 3),
                                    "scores": disk_scores["scores"], **disk_peaks.as_dict()},
                "speedup": round(total / trials[-1]["total"], 2) if trials[-1]["total"] else None,
                "same_scores": mem_scores["scores"] == disk_scores["scores"]}

    # ------------------------------------------------------------------------- 7. several GPUs
    def step_processes(self) -> dict:
        n = self.args.processes
        if n < 2:
            raise Skip("--processes 1 (pass --processes N on a machine with N GPUs)")
        have = torch.cuda.device_count() if self.device.startswith("cuda") else 0
        if have < n:
            raise Skip(f"needs {n} GPUs ({have} here)")
        self.need("models")
        files, _, _ = self.data_files()
        main = str(REPO / "llm_merging" / "main.py")
        common = ["-m", "task_arithmetic", "--base-model", str(self.path("base")), "--models",
                  str(self.path("lora-0")), str(self.path("lora-1")), "-d", *map(str, files.values()),
                  "--max-examples", str(self.args.eval_rows or SIZES[self.args.shape]["eval_rows"]),
                  "--batch-size", "8", "--device", "cuda", "--dtype", "float16", "--save", "none", "--quiet"]
        launcher = ([shutil.which("accelerate"), "launch"] if shutil.which("accelerate")
                    else [sys.executable, "-m", "accelerate.commands.launch"])
        runs = {}
        for key, prefix in (("one", [sys.executable, main]),
                            ("several", [*launcher, "--multi_gpu", "--num_processes", str(n), main])):
            left = self.deadline.remaining()
            if left <= 10:
                raise Skip("budget spent")
            out = self.work / f"processes-{key}"
            t0 = time.perf_counter()
            proc = subprocess.run([*prefix, *common, "--output_folder", str(out), "--time-budget", f"{left:.0f}"],
                                  capture_output=True, text=True, timeout=left + 60, cwd=str(REPO), check=False)
            runs[key] = {"seconds": round(time.perf_counter() - t0, 2), "returncode": proc.returncode}
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"the {key}-process run exited {proc.returncode}: {tail}")
        one = sorted((self.work / "processes-one" / "task_arithmetic" / "predictions").glob("*.jsonl"))
        several = self.work / "processes-several" / "task_arithmetic" / "predictions"
        same = {f.name: (several / f.name).is_file() and f.read_bytes() == (several / f.name).read_bytes() for f in one}
        entry = {"processes": n, "batch_size": 8, "runs": runs, "predictions_identical": same}
        if not one or not all(same.values()):
            entry.update(status="failed", error="the predictions of the multi-process run differ from one process's")
        return entry


class Recorder:
    """A merge method seen by the evaluation, keeping the token ids of every generated text."""

    def __init__(self, method) -> None:
        self._method = method
        self.ids: dict[str, list[int]] = {}

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_method":
            raise AttributeError(name)
        return getattr(self._method, name)

    def generate(self, batch):
        ids, texts = self._method.generate(batch)
        for text, seq in zip(batch["input"], ids):
            self.ids[text] = seq.tolist() if isinstance(seq, torch.Tensor) else [int(t) for t in seq]
        return ids, texts


def device_info(args) -> dict:
    info: dict[str, Any] = {"requested": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        index = torch.device(args.device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(name=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    else:
        info.update(name="cpu", threads=torch.get_num_threads(), cpus=os.cpu_count())
    return info


# ------------------------------------------------------------------------------------------ the table
def print_table(doc: dict) -> None:
    dev = doc["device"]
    steps = doc["steps"]
    print(f"\ndevice check: {dev.get('name')} ({dev['requested']}), shape {doc['shape']}, "
          f"{doc.get('seconds', 0):.0f} s of --budget {doc['budget_s']:g}; status {doc['status']}")
    print(f"{'step':<14} {'status':<8} {'s':>7}  result")
    for name, s in steps.items():
        print(f"{name:<14} {s['status']:<8} {s.get('seconds', 0):7.1f}  {summary(name, s)}")
    merges = steps.get("merges", {}).get("results", {})
    equal = steps.get("cpu_equality", {}).get("results", {})
    if merges or equal:
        print(f"\n{'merge':<28} {'device s':>8} {'math s':>7} {'GPU MiB':>8} {'host MiB':>9} {'CPU s':>7}  CPU vs device")
        for label in [*merges, *[k for k in equal if k not in merges]]:
            m = merges.get(label) or equal.get(label, {}).get("device", {})
            e = equal.get(label, {})
            gpu = m.get("peak_gpu_mib")
            line = (f"{label:<28} {m.get('seconds', float('nan')):8.1f} {m.get('merge_seconds') or float('nan'):7.2f} "
                    f"{'-' if gpu is None else f'{gpu:.0f}':>8} {m.get('peak_host_mib', float('nan')):9.0f} "
                    f"{e.get('cpu', {}).get('seconds', float('nan')):7.1f}  ")
            if e:
                line += e.get("verdict", e.get("status", "")) + ("" if e.get("identical") or "max_abs_diff" not in e else
                                        f" (max |Δ| {e['max_abs_diff']:.2e}, {e['differ_fraction']:.1e} of entries)")
            print(line)
    evals = steps.get("evaluation", {}).get("datasets", {})
    if evals:
        print(f"\n{'dataset':<10} {'rows':>4} {'auto bs':>7} {'auto ex/s':>9} {'bs-1 ex/s':>9} {'speed-up':>8} "
              f"{'same':>7} {'max |Δscore|':>12} {'full rows':>9} {'projected s':>11}")
        for name, r in evals.items():
            diff = "-" if r["max_abs_score_diff"] is None else f"{r['max_abs_score_diff']:.1e}"
            print(f"{name:<10} {r['rows']:>4} {r['auto']['batch_size'] or '-':>7} {r['auto']['examples_per_s'] or 0:9.2f} "
                  f"{r['batch_1']['examples_per_s'] or 0:9.2f} {r['speedup'] or 0:7.2f}x {r['same_predictions']:>7} "
                  f"{diff:>12} {r['full_validation']['rows']:>9} {r['full_validation']['projected_s'] or 0:11.1f}")
    search = steps.get("search", {})
    if "in_memory" in search:
        mem, disk = search["in_memory"]["trial"], search.get("disk_round_trip", {})
        line = f"\nsearch trial: in memory {mem['total']:.2f} s (merge {mem['merge']:.2f}, score {mem['score']:.2f})"
        if "total" in disk:
            line += (f" vs disk round trip {disk['total']:.2f} s (merge {disk['merge']:.2f}, save {disk['save']:.2f}, "
                     f"reload {disk['reload']:.2f}, score {disk['score']:.2f}): {search['speedup']}x; "
                     f"same scores: {search['same_scores']}")
        print(line)


def summary(name: str, s: dict) -> str:
    if s["status"] == "skipped":
        return s.get("reason", "")
    if s["status"] == "failed":
        return s.get("error", "")
    if name == "cuda_tests":
        return ", ".join(f"{v} {k}" for k, v in s.get("counts", {}).items()) or "no summary"
    if name == "models":
        size = f"{s['written_gib']:.1f} GiB" if s["written_gib"] >= 1 else f"{s['written_gib'] * 1024:.1f} MiB"
        return f"{s['parameters'] / 1e6:.1f}M parameters (fp16), {size} written (models, experts, subset)"
    if name == "merges":
        return f"{sum('seconds' in r for r in s['results'].values())}/{len(s['results'])} merges on {s['device']}"
    if name == "cpu_equality":
        verdicts = [r.get("verdict", r.get("status", "?")) for r in s["results"].values()]
        return ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    if name == "evaluation":
        return f"projected full validation {s['projected_full_validation_s']} s ({s['data']})"
    if name == "search":
        return f"same scores: {s.get('same_scores')}, speed-up {s.get('speedup')}x"
    if name == "processes":
        return f"predictions identical: {all(s['predictions_identical'].values())}"
    return ""


# ------------------------------------------------------------------------------------------ main
def parse_args(argv):
    def sizes(key):
        return ", ".join(f"{v[key]} for {k}" for k, v in SIZES.items())

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (only with --shape tiny)")
    p.add_argument("--shape", choices=tuple(SHAPES), default="llama-7b",
                   help="llama-7b (default: Llama-2-7B's shape, random fp16 weights) or tiny (the CPU form)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds; steps that would start later are skipped (default 420: a running step may overrun "
                        "it by its last piece, so the whole check stays under 8 minutes)")
    p.add_argument("--out", type=Path, default=Path("device_check.json"), help="the results (default ./device_check.json)")
    p.add_argument("--data-dir", default=str(REPO / "data"),
                   help="the kit's cosmos_qa.json, xsum.json and validation/*.csv (default: data/ in the repository, "
                        "the starter kit's layout; else the package's sample data)")
    p.add_argument("--eval-rows", type=int, default=None, help=f"rows per file timed in the evaluation ({sizes('eval_rows')})")
    p.add_argument("--search-rows", type=int, default=None, help=f"rows per file scoring the search trial ({sizes('search_rows')})")
    p.add_argument("--processes", type=int, default=1, help="also compare N GPU processes against one")
    p.add_argument("--skip", nargs="+", default=[], choices=STEPS, metavar="STEP", help=f"steps to skip: {', '.join(STEPS)}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, also of the CPU merges' process (default: 1 in the CPU form, where the "
                        "tiny tensors gain nothing from more and shared cores lose much; else torch's)")
    p.add_argument("--work-dir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="tracebacks of failed steps")
    p.add_argument("--child-cpu-merges", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("eval_rows", "search_rows"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not args.budget > 0:
        p.error("--budget must be positive")
    if args.processes < 1:
        p.error("--processes must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's "Using default tokenizer."
    if args.child_cpu_merges:
        logging.getLogger().setLevel(logging.WARNING)
        return child_cpu_merges(args.child_cpu_merges)
    cpu_form = args.device == "cpu" and args.shape == "tiny"
    if cpu_form:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: the engine's math on the CPU too
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child processes' too
    elif not torch.cuda.is_available():
        print("device check: no GPU on this machine, nothing checked (--device cpu --shape tiny runs the CPU form)")
        return 0
    from llm_merging.core.devices import check_device

    check_device(args.device)
    if args.device == "cpu" and not cpu_form:
        from llm_merging.core.errors import ConfigError

        raise ConfigError("--device cpu runs only the tiny shape (--shape tiny); the Llama-2-7B shape needs a GPU")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="device-check-", dir=args.work_dir))
    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    check = Check(args, work, Budget(args.budget, start=time.time()))
    try:
        status = check.run()
    finally:
        check.last_merged = None
        shutil.rmtree(work, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if check.doc["status"] == "running":  # stopped by a signal or an error: say so in the file
            check.doc["status"] = "interrupted"
            for entry in check.doc["steps"].values():
                if entry["status"] == "running":
                    entry["status"] = "interrupted"
            with contextlib.suppress(Exception):
                check.write()
    print_table(check.doc)
    print(f"results: {args.out}")
    return status


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through main's finally: the temporary folder is removed


def cli(argv=None) -> int:
    from llm_merging.core.errors import LLMMergingError

    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except LLMMergingError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"error: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(cli())
