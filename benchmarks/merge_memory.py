"""Peak memory and wall time of merging full fine-tunes: ``llm_merging`` vs mergekit on the same recipe.

Builds (once, cached under ``--workdir``) random Llama-architecture fp16 bases and three full fp16
fine-tunes of each (θᵢ = θ₀ + 0.01·noise, sharded safetensors), at two shapes:

* ``large``: vocab 32000, hidden 1024, 12 layers, intermediate 2816 (S ≈ 420 MiB; the embedding and the
  head are the largest tensors, 32000×1024);
* ``small``: vocab 8192, hidden 1024, 16 layers, intermediate 4096 (S ≈ 544 MiB; many mid-size tensors).

For every method (``ties`` density 0.5, ``dare_ties`` density 0.5, ``linear``, ``task_arithmetic``, and
``linear_no_base``: the experts' soup without a ``base_model``, the first expert the template) it
writes one mergekit-style YAML recipe (``dtype: float32`` math, ``out_dtype: float16``) and runs, each in
a fresh process:

* ``ours``: ``python llm_merging/main.py --recipe R --no-eval --dtype float16`` (model held in fp16, math in
  float32, as the recipe asks; the merged model is saved);
* ``mergekit``: ``mergekit-yaml R OUT --lazy-unpickle`` (its CPU defaults), when a mergekit installation is
  given with ``--mergekit PATH`` (a virtual environment or its ``mergekit-yaml``) or found in the virtual
  environment named by ``$MERGEKIT_VENV`` or on PATH;
* ``imports``: the interpreter with torch and transformers imported, for reference.

Per run (``bench_util.run_measured``): peak RSS (``ru_maxrss`` of the child from ``wait4``), wall seconds,
user/system CPU seconds and minor page faults; ours also reports its merge-phase seconds. Printed per shape and method: both peaks,
both times, ours/mergekit ratios and the target peak S + 3·T + 300 MiB (S the fp16 model size, T the
largest tensor in float32). ``--check`` also compares the two merged models (max |ours − mergekit| and the
fraction of entries that differ; TIES on fp16 experts has exact ties at the threshold, DARE's masks come
from different generators, so only linear/task arithmetic are expected to agree to rounding).

``--device cuda`` runs both tools with the math on the GPU (ours ``--device cuda``, mergekit ``--cuda``)
and adds the peak GPU memory (``torch.cuda.max_memory_allocated``) of each.

Usage::

    python benchmarks/merge_memory.py                                   # both shapes, all methods
    python benchmarks/merge_memory.py --shapes large --methods ties --mergekit PATH/TO/VENV --check
    python benchmarks/merge_memory.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_util import find_mergekit, log_tail, run_measured

ROOT = Path(__file__).resolve().parent.parent

#: name -> (vocab, hidden, layers, intermediate)
SHAPES = {"large": (32000, 1024, 12, 2816), "small": (8192, 1024, 16, 4096)}
METHODS = ("ties", "dare_ties", "linear", "task_arithmetic", "linear_no_base")
WEIGHTS = (0.5, 0.3, 0.2)


# ------------------------------------------------------------------------------------------ children
def build(workdir: Path, n_experts: int, layers: int, hidden: int, vocab: int = 8192,
          intermediate: int | None = None) -> int:
    """A random fp16 Llama base and ``n_experts`` fine-tunes of it under ``workdir``; returns S in bytes.
    (Also used by ``analysis_memory.py``.)"""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_merging.model.tiny import build_tokenizer

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float16)

    def save(m, out: Path) -> None:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        m.save_pretrained(str(tmp), max_shard_size="200MB")
        build_tokenizer(tmp)  # a complete model directory, as a user has
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)

    save(model, workdir / "base")
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            state = {n: (p.float() + 0.01 * torch.randn(p.shape, generator=gen)).half()
                     for n, p in model.named_parameters()}
        expert = AutoModelForCausalLM.from_config(cfg).to(torch.float16)
        expert.load_state_dict(state)
        del state
        save(expert, workdir / f"expert{i}")
        del expert
    return sum(p.numel() for p in model.parameters()) * 2


def build_shape(workdir: Path, shape: str, n_experts: int) -> dict:
    """The models of ``shape`` under ``workdir`` (built once); S and the largest tensor in fp32, in bytes."""
    vocab, hidden, layers, inter = SHAPES[shape]
    done = workdir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("experts") == n_experts:
        return json.loads(done.read_text())
    size = build(workdir, n_experts, layers, hidden, vocab, inter)
    largest = max(vocab * hidden, inter * hidden)
    info = {"size": size, "largest_fp32": 4 * largest, "experts": n_experts}
    done.write_text(json.dumps(info))
    return info


def run_engine(workdir: Path, n: int) -> None:
    """``task_arithmetic`` through the engine's Python API, in this process (used by ``analysis_memory.py``)."""
    from llm_merging.merging.TaskArithmetic import TaskArithmetic

    m = TaskArithmetic()
    m.base_model_name = str(workdir / "base")
    m.list_models = [str(workdir / f"expert{i}") for i in range(n)]
    m.device, m.dtype, m.progress = "cpu", "float16", False
    m.set_hyperparameters({"weights": 1.0 / n})
    m.merge()


def imports() -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return {}


def compare(a: Path, b: Path) -> dict:
    """max |a − b| over the tensors of two merged model directories, and the fraction of differing entries."""
    from safetensors import safe_open

    def files(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return {"error": f"tensor names differ: {sorted(set(fa) ^ set(fb))[:3]}"}
    worst, differ, total = 0.0, 0, 0
    for k in sorted(fa):
        with safe_open(str(fa[k]), framework="pt") as ha, safe_open(str(fb[k]), framework="pt") as hb:
            x, y = ha.get_tensor(k).float(), hb.get_tensor(k).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
    return {"max_abs_diff": worst, "differ_fraction": differ / max(total, 1)}


# ------------------------------------------------------------------------------------------ recipes
def recipe(workdir: Path, method: str, n_experts: int) -> dict:
    """The mergekit recipe of ``method`` on the models under ``workdir``."""
    experts = [str(workdir / f"expert{i}") for i in range(n_experts)]
    weights = [WEIGHTS[i % len(WEIGHTS)] for i in range(n_experts)]
    doc: dict = {"merge_method": method, "base_model": str(workdir / "base"), "dtype": "float32",
                 "out_dtype": "float16"}
    if method in ("ties", "dare_ties"):
        doc["parameters"] = {"density": 0.5}
        doc["models"] = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]
    elif method == "linear":  # the soup of the base and the experts (mergekit counts base_model as a model)
        doc["models"] = [{"model": e, "parameters": {"weight": 1.0}} for e in [doc["base_model"], *experts]]
    elif method == "linear_no_base":  # the soup of the experts alone: no base_model, the first is the template
        doc = {"merge_method": "linear", "dtype": "float32", "out_dtype": "float16",
               "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]}
    else:
        doc["models"] = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, weights)]
    return doc


# ------------------------------------------------------------------------------------------- runs
def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in a fresh process; its own peak RSS, wall/CPU seconds and page faults (``wait4``)."""
    m = run_measured(cmd, env=env, cwd=ROOT, log=log)
    if m.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({m.returncode}); see {log}:\n  {log_tail(log, 6)}")
    return {"seconds": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "user_s": m.user_s, "sys_s": m.sys_s,
            "minor_faults": m.minor_faults}


def child_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", mode, *args]


def run_ours(recipe_file: Path, out: Path, device: str, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "llm_merging" / "main.py"), "--recipe", str(recipe_file), "--output_folder",
           str(out), "--no-eval", "--dtype", "float16", "--device", device, "--seed", "0", "--quiet"]
    r = timed(cmd, out.with_suffix(".log"), env)
    reports = list(out.glob("*/report.json"))
    if reports:
        rep = json.loads(reports[0].read_text())
        phases = rep.get("timings") or rep.get("phase_seconds") or {}
        r["merge_s"] = (rep.get("merge_stats") or {}).get("seconds")
        r["phases"] = phases
        if "peak_gpu_mib" in rep:
            r["peak_gpu_mib"] = rep["peak_gpu_mib"]
    r["out"] = str(next(out.glob("*/merged_model"), out))
    return r


_MK_GPU_WRAPPER = (
    "import atexit, sys, torch\n"
    "atexit.register(lambda: print('PEAK_GPU_MIB', torch.cuda.max_memory_allocated() / 2**20, flush=True))\n"
    "from mergekit.scripts.run_yaml import main\n"
    "sys.argv[0] = 'mergekit-yaml'\n"
    "main()\n"
)


def run_mergekit(mergekit: str, recipe_file: Path, out: Path, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [str(recipe_file), str(out), "--lazy-unpickle", "--random-seed", "0", "--quiet"]
    log = out.with_suffix(".log")
    if device == "cuda":  # through its venv's python, to read its peak GPU memory at exit
        python = str(Path(mergekit).parent / "python")
        r = timed([python, "-c", _MK_GPU_WRAPPER, *args, "--cuda"], log)
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("PEAK_GPU_MIB"):
                r["peak_gpu_mib"] = float(line.split()[1])
    else:
        r = timed([mergekit, *args], log)
    r["out"] = str(out)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--mergekit", default=None, help="mergekit venv or its mergekit-yaml (default: $MERGEKIT_VENV, then PATH)")
    p.add_argument("--no-mergekit", action="store_true", help="time ours only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both tools do the math")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/OpenMP threads of both tools (OMP_NUM_THREADS; default: theirs). On a shared, "
                        "oversubscribed machine 1 avoids OpenMP spin-waiting and gives steadier times")
    p.add_argument("--repeat", type=int, default=1, help="runs per tool and method (the best time and peak are kept)")
    p.add_argument("--check", action="store_true", help="compare the two merged models")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llm_merging_merge_memory")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", choices=("build", "imports", "compare"), help=argparse.SUPPRESS)
    p.add_argument("--args", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        if args.child == "build":
            print(json.dumps(build_shape(Path(args.args[0]), args.args[1], args.experts)))
        elif args.child == "compare":
            print(json.dumps(compare(Path(args.args[0]), Path(args.args[1]))))
        else:
            print(json.dumps(imports()))
        return

    mergekit = None if args.no_mergekit else find_mergekit("mergekit-yaml", args.mergekit)
    if mergekit is None and not args.no_mergekit:
        print(f"mergekit not found ({args.mergekit or '$MERGEKIT_VENV, PATH'}): timing ours only. Install "
              "mergekit 0.1.5 in its own virtual environment and pass --mergekit PATH.")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)  # mergekit inherits it too
    import yaml

    # This parent never imports torch: Linux carries a parent's peak RSS into children it forks.
    results: list[dict] = []
    runs = args.workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base_rss = timed(child_cmd("imports"), runs / "imports.log", env)["peak_rss_mib"]
    print(f"imports (torch + transformers): {base_rss:.0f} MiB RSS; mergekit: {mergekit or '-'}; device {args.device}; "
          f"threads {args.threads or 'default'}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for shape in args.shapes:
        wd = args.workdir / shape
        wd.mkdir(parents=True, exist_ok=True)
        print(f"building the {shape} models in {wd} ...", flush=True)
        out = subprocess.run(child_cmd("build", "--experts", str(args.experts), "--args", str(wd), shape),
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"building the {shape} models failed:\n{out.stderr[-2000:]}")
        info = json.loads(out.stdout.strip().splitlines()[-1])
        s_mib, t_mib = info["size"] / 2**20, info["largest_fp32"] / 2**20
        target = s_mib + 3 * t_mib + 300
        vocab, hidden, layers, inter = SHAPES[shape]
        print(f"\n{shape}: vocab {vocab}, hidden {hidden}, {layers} layers, intermediate {inter}; S = {s_mib:.0f} MiB "
              f"(fp16), T = {t_mib:.0f} MiB (largest tensor, fp32), {args.experts} full fp16 fine-tunes; target peak "
              f"S + 3·T + 300 = {target:.0f} MiB", flush=True)
        for method in args.methods:
            rfile = runs / f"{shape}-{method}.yml"
            rfile.write_text(yaml.safe_dump(recipe(wd, method, args.experts), sort_keys=False))
            row: dict = {"shape": shape, "method": method, "S_mib": s_mib, "T_mib": t_mib, "target_mib": target}
            for rep in range(args.repeat):  # alternate the tools, back to back
                runs_now = {"ours": run_ours(rfile, runs / f"{shape}-{method}-ours", args.device, env)}
                if mergekit:
                    runs_now["mergekit"] = run_mergekit(mergekit, rfile, runs / f"{shape}-{method}-mergekit",
                                                        args.device)
                for tool, r in runs_now.items():
                    best = row.get(tool)
                    if best is None or r["seconds"] < best["seconds"]:
                        row[tool] = r
                    row[tool]["peak_rss_mib"] = min(row[tool]["peak_rss_mib"], r["peak_rss_mib"])
            if args.check and mergekit:
                cmp_ = subprocess.run(child_cmd("compare", "--args", row["ours"]["out"], row["mergekit"]["out"]),
                                      capture_output=True, text=True, env=env)
                row["check"] = json.loads(cmp_.stdout.strip().splitlines()[-1]) if cmp_.returncode == 0 else \
                    {"error": cmp_.stderr.strip().splitlines()[-1:]}
            results.append(row)
            print_row(row, flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"imports_rss_mib": base_rss, "device": args.device, "results": results},
                                        indent=2))


def print_row(row: dict, flush: bool = False) -> None:
    o, m = row["ours"], row.get("mergekit")
    line = (f"  {row['method']:<16} ours {o['peak_rss_mib']:6.0f} MiB {o['seconds']:6.1f} s "
            f"(merge {o.get('merge_s') or 0:5.1f} s, user {o['user_s']:5.1f} s, sys {o['sys_s']:4.1f} s, "
            f"{o['minor_faults'] / 1e6:4.2f} M faults)")
    if m:
        line += (f" | mergekit {m['peak_rss_mib']:6.0f} MiB {m['seconds']:6.1f} s (user {m['user_s']:5.1f} s, "
                 f"sys {m['sys_s']:4.1f} s, {m['minor_faults'] / 1e6:4.2f} M faults)")
    if "check" in row:
        line += f" | check {row['check']}"
    print(line, flush=flush)


def print_table(results: list[dict]) -> None:
    gpu = any("peak_gpu_mib" in r["ours"] for r in results)
    head = (f"\n{'shape':<6} {'method':<16} {'target':>7} {'ours MiB':>9} {'mk MiB':>7} {'peak ratio':>10} "
            f"{'ours s':>7} {'mk s':>7} {'time ratio':>10} {'ours cpu':>9} {'mk cpu':>7} {'cpu ratio':>9}"
            + (f" {'ours GPU':>9} {'mk GPU':>8}" if gpu else ""))
    print(head)
    cpu = lambda r: r["user_s"] + r["sys_s"]  # noqa: E731
    for r in results:
        o, m = r["ours"], r.get("mergekit")
        line = f"{r['shape']:<6} {r['method']:<16} {r['target_mib']:7.0f} {o['peak_rss_mib']:9.0f} "
        if m:
            line += (f"{m['peak_rss_mib']:7.0f} {o['peak_rss_mib'] / m['peak_rss_mib']:10.2f} {o['seconds']:7.1f} "
                     f"{m['seconds']:7.1f} {o['seconds'] / m['seconds']:10.2f} {cpu(o):9.1f} {cpu(m):7.1f} "
                     f"{cpu(o) / cpu(m):9.2f}")
        else:
            line += f"{'-':>7} {'-':>10} {o['seconds']:7.1f} {'-':>7} {'-':>10} {cpu(o):9.1f} {'-':>7} {'-':>9}"
        if gpu:
            line += f" {o.get('peak_gpu_mib', 0):9.0f} {(m or {}).get('peak_gpu_mib', 0):8.0f}"
        print(line)
    print("(ratios: ours / mergekit; s: wall seconds of the whole command; cpu: its user + system CPU seconds; "
          "target S + 3·T + 300 MiB)")


if __name__ == "__main__":
    main()
