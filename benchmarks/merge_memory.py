"""Peak memory and time of merging full fine-tunes: our streaming engine vs loading everything.

Builds a random Llama-architecture base (about 0.5 GB in fp16) and N full fine-tunes of it as sharded
safetensors, then runs, each in a fresh process so that peak RSS is its own:

* ``engine``: ``task_arithmetic`` through the merge engine (base loaded once, experts read tensor by tensor);
* ``load_all``: the starter kit's approach (every expert loaded whole with ``from_pretrained``, state
  dicts averaged, ``load_state_dict`` into the base);
* ``imports``: the interpreter with torch and transformers imported, for reference.

Usage: ``python benchmarks/merge_memory.py [--experts 3] [--layers 16] [--hidden 1024] [--workdir DIR]``.
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


def build(workdir: Path, n_experts: int, layers: int, hidden: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float16)
    model.save_pretrained(str(workdir / "base"), max_shard_size="200MB")
    from llm_merging.tiny import build_tokenizer

    build_tokenizer(workdir / "base")  # any tokenizer: the base must be complete
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            expert = {n: (p.float() + 0.01 * torch.randn(p.shape, generator=gen)).half() for n, p in model.named_parameters()}
        model_i = AutoModelForCausalLM.from_config(cfg).to(torch.float16)
        model_i.load_state_dict(expert)
        model_i.save_pretrained(str(workdir / f"expert{i}"), max_shard_size="200MB")
        del expert, model_i
    return size


def run_engine(workdir: Path, n: int) -> None:
    from llm_merging.merging.TaskArithmetic import TaskArithmetic

    m = TaskArithmetic()
    m.base_model_name = str(workdir / "base")
    m.list_models = [str(workdir / f"expert{i}") for i in range(n)]
    m.device, m.dtype, m.progress = "cpu", "float16", False
    m.set_hyperparameters({"weights": 1.0 / n})
    m.merge()


def run_load_all(workdir: Path, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    experts = [AutoModelForCausalLM.from_pretrained(str(workdir / f"expert{i}"), dtype=torch.float16).state_dict()
               for i in range(n)]
    merged = {k: sum(e[k].float() for e in experts).div(n).half() for k in experts[0]}
    base = AutoModelForCausalLM.from_pretrained(str(workdir / "base"), dtype=torch.float16)
    base.load_state_dict(merged)


def child(mode: str, workdir: Path, n: int) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    t0 = time.time()
    if mode == "engine":
        run_engine(workdir, n)
    elif mode == "load_all":
        run_load_all(workdir, n)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", choices=("build", "engine", "load_all", "imports"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        print(json.dumps({"size": build(args.workdir, args.experts, args.layers, args.hidden)}))
        return
    if args.child:
        child(args.child, args.workdir, args.experts)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building base + {args.experts} experts in {workdir} ...", flush=True)
    # Every step in its own process: Linux carries a parent's peak RSS into its children.
    def step(mode: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(workdir),
                              "--experts", str(args.experts), "--layers", str(args.layers), "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    size_mib = step("build")["size"] / 2**20
    rows = [step(mode) for mode in ("imports", "engine", "load_all")]
    target = 1.5 * size_mib + 300
    print(f"\nmodel size S = {size_mib:.0f} MiB (fp16), {args.experts} full fine-tunes; target peak < 1.5·S + 300 = {target:.0f} MiB\n")
    print(f"{'approach':<10} {'seconds':>8} {'peak RSS MiB':>13} {'vs target':>10}")
    for r in rows:
        verdict = "" if r["mode"] == "imports" else ("ok" if r["peak_rss_mib"] < target else "over")
        print(f"{r['mode']:<10} {r['seconds']:8.2f} {r['peak_rss_mib']:13.0f} {verdict:>10}")


if __name__ == "__main__":
    main()
