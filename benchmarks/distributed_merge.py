"""Several processes: every process merges, or process 0 merges and broadcasts? Both, timed in one run.

The parent builds a base model and LoRA experts (``--shape tiny``: the offline tiny decoder;
``--shape medium``: a random Llama of hidden 1024, vocabulary 32000, ``--layers`` layers, saved in
``--dtype``), then starts ``--processes`` processes the way torchrun does (gloo on CPU, NCCL with
``--device cuda``). Each process opens the same method (``-m``, default ties_merge) and, between
barriers, times

* **each merges**: ``method.merge()`` (load + merge) on every process, then
  :func:`llm_merging.core.processes.same_weights` (the fingerprint check the runner does);
* **0 merges + broadcast**: process 0 runs ``method.merge()`` while the others only load the base
  model, then every tensor is broadcast from process 0.

Both run ``--repeats`` times, interleaved; the best of each is printed (the first round warms up).

Printed per strategy: wall seconds (the slowest process, barrier to barrier), the seconds of the
fingerprint check or of the broadcast (after every process finished its part), and each process's
peak RSS over the whole run. ::

    python benchmarks/distributed_merge.py --shape tiny
    python benchmarks/distributed_merge.py --shape medium --layers 8 --processes 2
    python benchmarks/distributed_merge.py --shape medium --layers 32 --device cuda --processes 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def build_medium(work: Path, layers: int, dtype: str, n_experts: int, rank: int) -> tuple[str, list[str]]:
    """A random Llama (hidden 1024, vocabulary 32000) and ``n_experts`` LoRA adapters on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_merging.model import tiny

    base = work / "base"
    if not base.exists():
        tok = tiny.build_tokenizer(base)
        cfg = LlamaConfig(vocab_size=max(32000, len(tok)), hidden_size=1024, intermediate_size=2752,
                          num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).save_pretrained(str(base))
    experts = []
    for i in range(n_experts):
        out = work / f"lora-{i}"
        experts.append(str(out))
        if out.exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.save_pretrained(str(out))
    return str(base), experts


def open_method(args):
    from llm_merging.merging.factory import configure, instantiate
    from llm_merging.pipeline import RunConfig

    method = instantiate(args.method)
    cfg = RunConfig(method=args.method, base_model=args.base, models=args.models, device=args.device,
                    dtype=args.dtype if args.shape != "tiny" else None, progress=False)
    configure(method, cfg.method_options(method.name, method.all_hyperparameters()))
    method.preflight()
    return method


def child(args) -> None:
    from llm_merging.core import processes as distributed

    procs = distributed.start()
    args.device = procs.device  # the process's own device
    results: dict = {}

    def barrier():
        procs.max(0)

    def each():
        method = open_method(args)
        barrier()
        t0 = time.perf_counter()
        method.merge()
        barrier()
        t1 = time.perf_counter()
        verdict = distributed.same_weights(procs, method.base_model)
        barrier()
        t2 = time.perf_counter()
        return {"wall": t2 - t0, "check": t2 - t1, "verdict": verdict}, distributed.fingerprint(method.base_model)

    def broadcast(reference):
        method = open_method(args)
        barrier()
        t0 = time.perf_counter()
        if procs.is_main:
            method.merge()
        else:
            method._load_base_model()
        procs.max(0)  # the others wait for process 0's merge
        t1 = time.perf_counter()
        distributed.broadcast_weights(procs, method.base_model)
        barrier()
        t2 = time.perf_counter()
        same = distributed.fingerprint(method.base_model) == reference
        return {"wall": t2 - t0, "check": t2 - t1, "verdict": "same as each" if same else "DIFFERENT"}

    for _ in range(args.repeats):  # interleaved, best of each (the first round also warms up)
        got, reference = each()
        if "each" not in results or got["wall"] < results["each"]["wall"]:
            results["each"] = got
        got = broadcast(reference)
        if "broadcast" not in results or got["wall"] < results["broadcast"]["wall"]:
            results["broadcast"] = got
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    everyone = procs.exchange(results)
    if procs.is_main:
        print(json.dumps(everyone))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "medium"], default="tiny")
    ap.add_argument("--layers", type=int, default=8, help="medium: layers")
    ap.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"], help="medium: dtype")
    ap.add_argument("--rank", type=int, default=16, help="medium: LoRA rank")
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("-m", "--method", default="ties_merge")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both strategies, interleaved (best of each)")
    ap.add_argument("--workdir", default=None, help="where the medium models are built (default: a temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args)
    from llm_merging.model import tiny

    if args.shape == "tiny":
        base, experts = str(tiny.base_dir()), [str(tiny.lora_expert_dir("decoder", i)) for i in range(args.experts)]
    else:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="dist-merge-"))
        base, experts = build_medium(work, args.layers, args.dtype, args.experts, args.rank)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--dtype", args.dtype, "-m", args.method,
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--base", base, "--models", *experts]
    env = {**os.environ, "WORLD_SIZE": str(args.processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": str(args.threads), "LOCAL_WORLD_SIZE": str(args.processes)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(args.processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a process failed: {[p.returncode for p in procs]}")
    everyone = json.loads(outs[0].strip().splitlines()[-1])
    shape = "tiny decoder" if args.shape == "tiny" else f"Llama hidden 1024, {args.layers} layers, vocab 32000, {args.dtype}"
    print(f"{args.method}, {len(experts)} LoRA experts, {shape}; {args.processes} processes on {args.device}, "
          f"{args.threads} thread(s) each")
    print(f"{'strategy':<26}{'wall s':>9}{'check/bcast s':>15}  {'weights':<14}{'peak RSS MiB (each process, whole run)'}")
    for key, label in (("each", "each process merges"), ("broadcast", "0 merges + broadcast")):
        wall = max(r[key]["wall"] for r in everyone)
        check = max(r[key]["check"] for r in everyone)
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in everyone)
        print(f"{label:<26}{wall:9.2f}{check:15.2f}  {everyone[0][key]['verdict']:<14}{rss}")


if __name__ == "__main__":
    main()
