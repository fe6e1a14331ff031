"""Calibration cost of data-aware methods: seconds and peak memory vs the number of calibration prompts.

A Llama-architecture base at a realistic width (``--hidden 1024``, vocabulary 32000, ``--layers`` layers) is
built with random weights, with ``--experts`` random LoRA experts (rank 16 on every projection). Each
method of ``--methods`` merges them with 32/128/512 prompts (``--prompts``) of about ``--prompt-tokens``
tokens, each configuration in a fresh process (so peak RSS is its own); baselines on the same models: task
arithmetic (no calibration), and the same prompts through the base model once per expert without hooks
(the forward passes alone; "merge s" is then load + passes). Printed per configuration: calibration seconds, forward passes, tokens,
peak statistics (Gram matrices / Fisher values held at once), peak RSS (and GPU) of the process, and the
merge phase's seconds (calibration included).

    python benchmarks/calibration_cost.py                       # CPU, float32
    python benchmarks/calibration_cost.py --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her they this which had not are but "
         "were have one all their there been has when who will more no if out so said what up its about into "
         "than them can only other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years where much your way").split()


def build(work: Path, hidden: int, layers: int, experts: int, rank: int) -> tuple[Path, list[Path]]:
    """The base (random weights, the tiny tokenizer) and its LoRA experts, built once in ``work``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm_merging.model import tiny

    base = work / f"base-h{hidden}-l{layers}"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(str(base))
        AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder"))).save_pretrained(str(base))
    out = []
    for i in range(experts):
        path = work / f"lora-h{hidden}-l{layers}-r{rank}-{i}"
        if not (path / "adapter_config.json").is_file():
            model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(
                task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            gen = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            model.save_pretrained(str(path))
        out.append(path)
    return base, out


def prompts(path: Path, n: int, words: int) -> Path:
    rnd = random.Random(n)
    if path.is_file():
        return path
    path.write_text("".join(" ".join(rnd.choice(WORDS) for _ in range(words)) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def plain_forward(args) -> None:
    """Baseline: the same prompts through the base model, once per expert, no hooks (what the forward passes
    alone cost); printed as JSON like :func:`one`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_merging.merging import calibration as cal
    from llm_merging.core.resources import peak_memory

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.base)
    load = time.time() - t0
    texts = cal.read_prompts(args.data)[: args.n]
    ids, _ = cal.encode(tok, texts, cal.context_length(model, tok))
    t0 = time.time()
    passes = tokens = 0
    for _ in args.models:
        for batch in cal.batches(ids, tok.eos_token_id, args.device):
            cal.run_forward(model, batch)
            passes += 1
            tokens += int(batch["attention_mask"].sum())
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - t0
    print(json.dumps({"merge_seconds": load + seconds, "calibration": {"seconds": seconds, "forward_passes": passes,
                                                                       "tokens": tokens}, **peak_memory()}))


def one(args) -> None:
    """One configuration in this process: print its figures as JSON."""
    from llm_merging.pipeline import CalibrationConfig, RunConfig, Runner

    if args.one == "forward":
        return plain_forward(args)

    cfg = RunConfig(method=args.one, base_model=args.base, models=args.models, device=args.device, dtype=args.dtype,
                    evaluate=False, save="none", progress=False, output_folder=args.out,
                    calibration=CalibrationConfig(data=[args.data] if args.data else None),
                    calibration_examples=args.n if args.data else None)
    runner = Runner(cfg)
    status = runner.run()
    if status != 0:
        raise SystemExit(f"{args.one}: {runner.report.get('error')}")
    rep = runner.report
    c = rep.get("calibration") or {}
    print(json.dumps({"merge_seconds": rep["phases_seconds"].get("merge"), "calibration": c,
                      "peak_rss_mib": rep.get("peak_rss_mib"), "peak_gpu_mib": rep.get("peak_gpu_mib")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["regmean", "regmean_plus", "fisher", "adamerging"])
    p.add_argument("--prompts", nargs="+", type=int, default=[32, 128, 512])
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int, default=64, help="about this many tokens a prompt")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--work-dir", dest="work", default="/tmp/llm-merging-calibration-cost")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    from llm_merging.merging import method_targets

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, experts = build(work, args.hidden, args.layers, args.experts, args.rank)
    known = method_targets()
    methods = [m for m in args.methods if m in known]
    skipped = [m for m in args.methods if m not in known]
    print(f"base: hidden {args.hidden}, {args.layers} layers, vocabulary 32000, {args.experts} LoRA experts (rank "
          f"{args.rank}, every projection); {args.device} {args.dtype}; ~{args.prompt_tokens} words a prompt"
          + (f"; not registered here: {', '.join(skipped)}" if skipped else ""))

    def run(method: str, n: int | None) -> dict:
        out = tempfile.mkdtemp(prefix="out-", dir=work)  # several runs may share the work directory
        cmd = [sys.executable, __file__, "--one", method, "--base", str(base), "--models", *map(str, experts),
               "--device", args.device, "--dtype", args.dtype, "--out", out]
        if n is not None:
            data = prompts(work / f"prompts-{n}x{args.prompt_tokens}-{os.getpid()}.txt", n, args.prompt_tokens)
            cmd += ["--data", str(data), "--n", str(n)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall": time.time() - t0}
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall": time.time() - t0}

    print(f"\n{'method':<34} {'prompts':>7} {'calib s':>8} {'passes':>6} {'tokens':>8} {'stats MiB':>9} "
          f"{'peak RSS MiB':>12} {'peak GPU MiB':>12} {'merge s':>8}", flush=True)

    def show(name: str, n: int | None, r: dict) -> None:  # each row as soon as it is measured
        if "error" in r:
            print(f"{name:<34} {n if n else '-':>7}  failed: {r['error']}", flush=True)
            return
        c = r["calibration"]
        gpu = r.get("peak_gpu_mib")
        print(f"{name:<34} {n if n else '-':>7} {c.get('seconds', 0):8.2f} {c.get('forward_passes', 0):6d} "
              f"{c.get('tokens', 0):8d} {c.get('peak_statistics_mib', 0):9.1f} {r['peak_rss_mib']:12.1f} "
              f"{gpu if gpu is not None else '-':>12} {r['merge_seconds']:8.2f}", flush=True)

    show("task_arithmetic (no calibration)", None, run("task_arithmetic", None))
    for n in args.prompts:
        show("forward passes alone (no hooks)", n, run("forward", n))
        for m in methods:
            show(m, n, run(m, n))


if __name__ == "__main__":
    main()
