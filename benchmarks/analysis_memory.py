"""Peak memory and time of the task-vector analysis (`llm-merging analyze`) next to the merge engine.

Builds the same random Llama-architecture base and N full fine-tunes as ``merge_memory.py`` (about 0.5 GB
in fp16), then runs, each in a fresh process so that peak RSS is its own:

* ``imports``: the interpreter with torch and transformers imported, for reference;
* ``engine``: ``task_arithmetic`` through the merge engine (base loaded once, experts read tensor by tensor);
* ``analyze``: the analysis of the same experts (θ₀ and each τ read tensor by tensor; no model loaded).

Usage: ``python benchmarks/analysis_memory.py [--experts 3] [--layers 16] [--hidden 1024] [--workdir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run_analyze(workdir: Path, n: int) -> dict:
    from llm_merging.insight.analysis import analyze_method
    from llm_merging.merging.base import TaskVectorMerge

    m = TaskVectorMerge("analyze")
    m.base_model_name, m.base_model_revision_id = str(workdir / "base"), None
    m.list_models = [str(workdir / f"expert{i}") for i in range(n)]
    m.is_peft, m.progress = None, False
    m.preflight()
    doc = analyze_method(m, device="cpu", progress=False)
    return {"tensors": doc["tensors_analyzed"], "cosine_01": doc["overall"]["cosine"][0][1]}


def child(mode: str, workdir: Path, n: int) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from merge_memory import run_engine

    t0 = time.time()
    extra = {}
    if mode == "engine":
        run_engine(workdir, n)
    elif mode == "analyze":
        extra = run_analyze(workdir, n)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mib": peak, **extra}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=("build", "engine", "analyze", "imports"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        from merge_memory import build

        print(json.dumps({"size": build(args.workdir, args.experts, args.layers, args.hidden)}))
        return
    if args.child:
        child(args.child, args.workdir, args.experts)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="analysis-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building base + {args.experts} experts in {workdir} ...", flush=True)

    def step(mode: str) -> dict:  # each in its own process: Linux carries a parent's peak RSS into children
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(workdir),
                              "--experts", str(args.experts), "--layers", str(args.layers), "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    size_mib = step("build")["size"] / 2**20 if not (workdir / "base").exists() else None
    rows = [step(mode) for mode in ("imports", "engine", "analyze")]
    if size_mib is not None:
        print(f"\nmodel size S = {size_mib:.0f} MiB (fp16), {args.experts} full fine-tunes\n")
    print(f"{'approach':<10} {'seconds':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['mode']:<10} {r['seconds']:8.2f} {r['peak_rss_mib']:13.0f}")


if __name__ == "__main__":
    main()
