"""Search speed: seconds per candidate in memory vs a full merge → save → reload → evaluate cycle of the
same candidate, in one run.

In memory (what ``--search`` does): the base stays loaded, θ₀ of the touched parameters and the LoRA
factors are cached; a candidate is merged in place from θ₀ (the method's ``merge_resolved``), scored on
the search rows and undone. Disk round trip (what ``mergekit-evolve`` does per candidate): the usual
``method.merge()`` (base loaded from its checkpoint, experts opened, streamed merge), ``save_full`` to a
temporary directory, the saved model and tokenizer loaded back, then the same scoring: once in the same
process (a lower bound) and once in a fresh Python process, as an external evaluator does. Every side
scores the same rows with the same evaluator; the script checks that they give the same scores.

    python benchmarks/search_speed.py                      # tiny decoder, 3 tiny LoRA experts, 2 CPU threads
    python benchmarks/search_speed.py --shape larger       # a random 12-layer, 768-wide Llama, 3 rank-16 LoRAs
    python benchmarks/search_speed.py --method ties_merge --set density=0.3 --device cuda

Search rows: the first ``--examples`` rows of each ``--data`` file (default: the kit's validation files
under ``../shared/data/starter_kit`` when present, else the package's labelled samples).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_merging.model import tiny  # noqa: E402
from llm_merging.data import load_examples  # noqa: E402
from llm_merging.evaluation import unique_names  # noqa: E402
from llm_merging.merging.hparams import parse_overrides  # noqa: E402
from llm_merging.merging.factory import instantiate  # noqa: E402
from llm_merging.search.candidates import Fitness, InMemoryMerger  # noqa: E402

KIT = REPO.parent / "shared" / "data" / "starter_kit" / "validation"
LARGER = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
              num_key_value_heads=4)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_larger(root: Path, n_experts: int, rank: int) -> tuple[Path, list[Path]]:
    """A random Llama-style base (tiny tokenizer) and ``n_experts`` LoRA adapters of it, built once."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    base = root / "base"
    if not (base / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False, **LARGER)
        LlamaForCausalLM(config).save_pretrained(str(base))
        tok.save_pretrained(str(base))
    experts = []
    for i in range(n_experts):
        path = root / f"lora-{i}"
        experts.append(path)
        if (path / "adapter_config.json").is_file():
            continue
        model = LlamaForCausalLM.from_pretrained(str(base))
        peft = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                target_modules=LORA_MODULES))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft.save_pretrained(str(path))
    return base, experts


def configure(name: str, base: Path, experts: list[Path], values: dict, device: str):
    method = instantiate(name)
    method.base_model_name, method.base_model_revision_id = str(base), None
    method.list_models, method.is_peft, method.device, method.progress = [str(e) for e in experts], None, device, False
    method.max_gen_len = 16
    method.set_hyperparameters(values, from_text=True)
    method.preflight()
    return method


def round_trip(name, base, experts, values, device, fitness, tmp: Path) -> tuple[dict, dict]:
    """One candidate the slow way; returns (seconds by step, scores)."""
    from transformers import AutoModelForCausalLM

    from llm_merging.model.save import save_full

    t = {}
    t0 = time.perf_counter()
    method = configure(name, base, experts, values, device)
    method.merge()
    t["merge (load base, open experts, merge)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = tmp / "candidate"
    save_full(method.base_model, method.input_tokenizer, out, {"method": name})
    t["save"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluator = configure(name, base, experts, values, device)  # a fresh process would start here
    evaluator.base_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=method.base_model.dtype).to(
        method.base_model.device).eval()
    evaluator.base_model_name = str(out)
    evaluator._load_tokenizer()
    t["reload"] = time.perf_counter() - t0
    del method
    t0 = time.perf_counter()
    scores = fitness.evaluate(evaluator)
    t["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cold = fresh_process_scores(out, name, fitness, device, tmp)
    t["fresh evaluator process"] = time.perf_counter() - t0
    if cold != scores["scores"]:
        raise SystemExit(f"the fresh evaluator process scored {cold}, the in-process one {scores['scores']}")
    shutil.rmtree(out, ignore_errors=True)
    return t, scores


EVALUATOR = """
import json, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from llm_merging.merging.factory import instantiate
from llm_merging.search.candidates import Fitness
spec = json.load(open({spec!r}))
m = instantiate(spec["method"])
m.base_model_name, m.base_model_revision_id, m.device, m.max_gen_len = spec["model"], None, spec["device"], 16
m.architecture = "decoder"
m._load_base_model()
m._load_tokenizer()
out = Fitness(spec["names"], spec["rows"], [len(r) for r in spec["rows"]]).evaluate(m)
print(json.dumps(out["scores"]))
"""


def fresh_process_scores(model_dir: Path, name: str, fitness, device: str, tmp: Path) -> dict:
    """Load the saved candidate in a new Python process and score it there (mergekit-evolve's evaluator)."""
    import subprocess

    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"method": name, "model": str(model_dir), "device": device, "names": fitness.names,
                                "rows": fitness.rows}), encoding="utf-8")
    code = EVALUATOR.format(repo=str(REPO), threads=torch.get_num_threads(), spec=str(spec))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the fresh evaluator process failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("tiny", "larger"), default="tiny")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the larger shape's experts")
    p.add_argument("--method", default="task_arithmetic")
    p.add_argument("--set", dest="values", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", nargs="+", help="search files (default: kit validation files, else the tiny samples)")
    p.add_argument("--examples", type=int, default=8, help="rows per search file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", help="where the larger shape's models are built (default: a temporary directory)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    values = parse_overrides(args.values)

    with tempfile.TemporaryDirectory(prefix="search-speed-") as tmp_name:
        tmp = Path(tmp_name)
        if args.shape == "tiny":
            base = tiny.base_dir("decoder")
            experts = [tiny.lora_expert_dir("decoder", i) for i in range(args.experts)]
        else:
            root = Path(args.work_dir) if args.work_dir else tmp / "models"
            base, experts = build_larger(root, args.experts, args.rank)
        files = args.data or ([str(KIT / "cosmos_qa.csv"), str(KIT / "xsum.csv")] if (KIT / "cosmos_qa.csv").is_file()
                              else [f for f in tiny.sample_data_files() if not f.endswith(".csv")])
        rows = [[r for r in load_examples(f) if "label" in r or r.get("target")][: args.examples] for f in files]
        fitness = Fitness(unique_names(files), rows, [len(r) for r in rows])

        method = configure(args.method, base, experts, values, args.device)
        t0 = time.perf_counter()
        merger = InMemoryMerger(method, progress=False)
        setup = time.perf_counter() - t0
        merger.share_with(method)
        method.check_all_tensors(merger.names)
        mem, mem_scores = [], None
        slow, slow_scores = [], None
        fresh: list[dict] = []
        for _ in range(args.repeats):  # interleaved, so that load spikes of a shared machine hit both
            t0 = time.perf_counter()
            merge_s = merger.apply(method.merge_resolved)
            t1 = time.perf_counter()
            mem_scores = fitness.evaluate(method)
            merger.restore()
            mem.append({"merge": merge_s, "evaluate": time.perf_counter() - t1, "total": time.perf_counter() - t0})
            steps, slow_scores = round_trip(args.method, base, experts, values, args.device, fitness, tmp)
            cold = steps.pop("fresh evaluator process")
            slow.append({**steps, "total": sum(steps.values())})
            fresh.append({"merge + save": steps["merge (load base, open experts, merge)"] + steps["save"],
                          "reload + evaluate in a new process": cold})
            fresh[-1]["total"] = sum(fresh[-1].values())
        n_params = sum(p.numel() for p in merger.model.parameters())
        merger.release()

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    same = mem_scores["scores"] == slow_scores["scores"]
    print(f"shape {args.shape}: {n_params / 1e6:.1f}M parameters, {len(experts)} LoRA experts, method {args.method} "
          f"{json.dumps(values) if values else '(defaults)'}, device {args.device}, {args.threads} threads")
    print(f"search rows: {', '.join(f'{n} {len(r)}' for n, r in zip(fitness.names, rows))}; "
          f"median of {args.repeats} interleaved runs")
    print(f"in memory   : {med(mem, 'total'):7.3f} s per candidate (merge {med(mem, 'merge'):.3f}, "
          f"evaluate {med(mem, 'evaluate'):.3f}); one-off setup {setup:.2f} s")
    print(f"disk cycle  : {med(slow, 'total'):7.3f} s per candidate (" +
          ", ".join(f"{k} {med(slow, k):.3f}" for k in slow[0] if k != "total") + ")")
    rest_mem = med(mem, "total") - med(mem, "evaluate")
    rest_slow = med(slow, "total") - med(slow, "evaluate")
    print(f"speed-up    : {med(slow, 'total') / med(mem, 'total'):.1f}x per candidate; without the evaluation both "
          f"pay: {rest_slow / rest_mem:.1f}x ({rest_mem:.3f} s vs {rest_slow:.3f} s); same scores: {same}")
    print(f"disk cycle, fresh evaluator process (mergekit-evolve's way): {med(fresh, 'total'):7.3f} s per candidate (" +
          ", ".join(f"{k} {med(fresh, k):.3f}" for k in fresh[0] if k != "total") +
          f"); speed-up {med(fresh, 'total') / med(mem, 'total'):.1f}x; same scores: True")
    if not same:
        print(f"  in memory: {mem_scores['scores']}\n  disk     : {slow_scores['scores']}")


if __name__ == "__main__":
    main()
