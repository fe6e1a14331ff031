"""LoRA extraction side by side: ``llm-merging extract-lora`` against ``mergekit-extract-lora`` (0.1.5).

Builds (once, cached under ``--workdir``) an fp16 Llama-shaped base (vocabulary ``--vocab``, hidden
``--hidden``, ``--layers`` layers) and a synthetic full fine-tune of it: per matrix of a Linear layer,
ΔW = U diag(σ) Vᵀ of rank ``--true-rank`` with geometrically decaying σ plus dense noise; every norm weight
changed; the embedding and the head changed by small noise. Then runs both tools at the same rank
(``--rank``), each in a fresh process (wall seconds and its own peak RSS from ``wait4``), and reads both
adapters back: per LoRA module the relative Frobenius error ‖ΔW − B·A‖/‖ΔW‖ (ΔW from the fp16 checkpoints
in float64, the factors as saved), and whether the tensors kept whole equal the fine-tune's.

    python benchmarks/extract_lora.py [--rank 16] [--vocab 32000] [--hidden 1024]
        [--layers 4] [--workdir DIR] [--mergekit PATH/TO/MERGEKIT-VENV] [--svd auto] [--device cpu]

mergekit is found through ``--mergekit`` (a venv or the executable), ``$MERGEKIT_VENV`` or PATH; it runs as a
command, never imported. Without it only our side runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_util import find_mergekit, log_tail, run_measured  # benchmarks/ is sys.path[0]

ROOT = Path(__file__).resolve().parent.parent


def build(workdir: Path, vocab: int, hidden: int, layers: int, true_rank: int, seed: int = 0) -> tuple[Path, Path]:
    """The fp16 base and fine-tune (cached by shape)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    tag = f"v{vocab}-h{hidden}-l{layers}-r{true_rank}"
    base, ft = workdir / f"base-{tag}", workdir / f"ft-{tag}"
    if (ft / "model.safetensors").is_file() and (base / "model.safetensors").is_file():
        return base, ft
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="float16")
    model = LlamaForCausalLM(cfg).to(torch.float16)
    shutil.rmtree(base, ignore_errors=True)
    model.save_pretrained(base)
    del model
    g = torch.Generator().manual_seed(seed + 1)
    tensors = load_file(str(base / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        w = t.float()
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name:
            m, n = w.shape
            u, _ = torch.linalg.qr(torch.randn(m, true_rank, generator=g))
            v, _ = torch.linalg.qr(torch.randn(n, true_rank, generator=g))
            sigma = 0.3 * 0.85 ** torch.arange(true_rank, dtype=torch.float32)
            delta = (u * sigma) @ v.T + 2e-4 * torch.randn(m, n, generator=g)
        elif t.dim() == 2:
            delta = 1e-3 * torch.randn(w.shape, generator=g)
        else:
            delta = 0.02 * torch.randn(w.shape, generator=g)
        out[name] = (w + delta).to(torch.float16)
    shutil.rmtree(ft, ignore_errors=True)
    shutil.copytree(base, ft)
    save_file(out, str(ft / "model.safetensors"), metadata={"format": "pt"})
    return base, ft


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds, CPU seconds and its own peak RSS (``wait4``)."""
    m = run_measured(cmd, cwd=ROOT, log=log)
    if m.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed; see {log}:\n  {log_tail(log)}")
    return {"seconds": m.wall_s, "peak_rss_mib": m.peak_rss_mib, "cpu_s": m.cpu_s}


def read_adapter(path: Path, base: dict, ft: dict) -> dict:
    """Per LoRA module the relative error of the saved factors, and the kept tensors that differ from the
    fine-tune."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    config = json.loads((path / "adapter_config.json").read_text())
    errors, ranks = {}, {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        mod = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = config.get("alpha_pattern", {}).get(mod, config.get("lora_alpha", r))
        rr = config.get("rank_pattern", {}).get(mod, config.get("r", r))
        delta = ft[mod + ".weight"].double() - base[mod + ".weight"].double()  # float64: no rounding in the figure
        rec = (b.double() @ a.double()) * (alpha / rr)
        errors[mod] = float(torch.linalg.matrix_norm(delta - rec) / torch.linalg.matrix_norm(delta))
        ranks[mod] = r
    kept_bad = [k for k, t in tensors.items() if "lora_" not in k
                and k[len("base_model.model."):] in ft and not torch.equal(t, ft[k[len("base_model.model."):]])]
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"errors": errors, "ranks": ranks, "kept": sorted(k for k in tensors if "lora_" not in k),
            "kept_differ": kept_bad, "bytes": size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--true-rank", dest="true_rank", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "llmm-extract-bench"))
    p.add_argument("--mergekit", default=None)
    p.add_argument("--svd", default="auto", choices=("auto", "full", "randomized"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--build-only", dest="build_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.build_only:
        build(workdir, args.vocab, args.hidden, args.layers, args.true_rank)
        return
    # built in a child: this process stays small (a child's peak RSS includes its parent's at fork)
    subprocess.run([sys.executable, __file__, "--build-only", "--workdir", str(workdir), "--vocab", str(args.vocab),
                    "--hidden", str(args.hidden), "--layers", str(args.layers), "--true-rank", str(args.true_rank)],
                   check=True)
    tag = f"v{args.vocab}-h{args.hidden}-l{args.layers}-r{args.true_rank}"
    base_dir, ft_dir = workdir / f"base-{tag}", workdir / f"ft-{tag}"
    print(f"shape: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, fp16; ΔW rank {args.true_rank} "
          f"+ noise per matrix; extraction rank {args.rank} (models built/cached in {time.time() - t0:.0f} s)")
    results = {}  # the tools run first, from a small parent: a child's peak RSS counts the parent's at fork
    ours_out = workdir / "ours"
    shutil.rmtree(ours_out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "llm_merging" / "main.py"), "extract-lora", "--base-model", str(base_dir),
           "--model", str(ft_dir), "--out", str(ours_out), "--rank", str(args.rank), "--svd", args.svd,
           "--device", args.device, "-q"]
    results["llm-merging"] = timed(cmd, workdir / "ours.log")
    mk = find_mergekit("mergekit-extract-lora", args.mergekit)
    if mk is None:
        print("mergekit-extract-lora not found (--mergekit, $MERGEKIT_VENV or PATH): only our side runs")
    else:
        mk_out = workdir / "mergekit"
        shutil.rmtree(mk_out, ignore_errors=True)
        cmd = [mk, "--model", str(ft_dir), "--base-model", str(base_dir), "--out-path", str(mk_out),
               "--max-rank", str(args.rank), "--device", args.device]
        results["mergekit"] = timed(cmd, workdir / "mergekit.log")
    from safetensors.torch import load_file

    base, ft = load_file(str(base_dir / "model.safetensors")), load_file(str(ft_dir / "model.safetensors"))
    results["llm-merging"].update(read_adapter(ours_out, base, ft))
    if mk is not None:
        results["mergekit"].update(read_adapter(workdir / "mergekit", base, ft))
    ours = results["llm-merging"]
    theirs = results.get("mergekit")
    print(f"\n{'module':<34}{'rank':>5}{'err ours':>12}" + (f"{'err mergekit':>14}{'ours ≤':>8}" if theirs else ""))
    wins = 0
    for mod in sorted(ours["errors"]):
        line = f"{mod:<34}{ours['ranks'][mod]:>5}{ours['errors'][mod]:>12.6f}"
        if theirs:
            e = theirs["errors"].get(mod)
            ok = e is not None and ours["errors"][mod] <= e
            wins += ok
            line += f"{e if e is not None else float('nan'):>14.6f}{'yes' if ok else 'NO':>8}"
        print(line)
    print()
    for label, r in results.items():
        errs = list(r["errors"].values())
        print(f"{label:<12} {r['seconds']:7.1f} s wall  {r['cpu_s']:7.1f} s CPU  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
              f"{len(errs)} LoRA modules, error max {max(errs):.6f} mean {sum(errs) / len(errs):.6f}; "
              f"{len(r['kept'])} tensors kept whole ({len(r['kept_differ'])} differ from the fine-tune); "
              f"{r['bytes'] / 2**20:.0f} MiB on disk")
    if theirs:
        print(f"\nours ≤ mergekit on {wins}/{len(ours['errors'])} modules; time ratio ours/mergekit "
              f"{ours['seconds'] / theirs['seconds']:.2f}; peak RSS ratio {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
