"""Seconds per module of ``--save adapter``'s truncated SVD: full SVD (before) vs randomized (after).

    python benchmarks/adapter_svd.py [--size 4096] [--rank 32] [--threads 2] [--device cpu|cuda]

Two cases per run: a ΔW of rank exactly ``rank`` (a linear merge of LoRA experts: both must be exact) and
a full-rank ΔW (a trimming merge such as TIES: the error is reported, randomized vs the optimum).
"""
from __future__ import annotations

import argparse
import time

import torch

from llm_merging import ops


def timed(fn, repeat: int = 2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, r = args.size, args.rank
    low = (torch.randn(n, r, generator=g) @ torch.randn(r, n, generator=g) / n).to(args.device)
    full = (low + 1e-3 * torch.randn(n, n, generator=g).to(args.device))
    print(f"{n}x{n} float32, rank {r}, {args.threads} threads, {args.device}")
    print(f"{'case':<22}{'full SVD s':>12}{'randomized s':>14}{'speed-up':>10}{'err full':>12}{'err rand':>12}")
    for label, mat in (("rank-r ΔW (linear)", low), ("full-rank ΔW (TIES)", full)):
        t_full, (_, _, e_full) = timed(lambda: ops.low_rank(mat, r, method="full"), repeat=1)
        t_rand, (_, _, e_rand) = timed(lambda: ops.low_rank(mat, r, method="randomized"))
        print(f"{label:<22}{t_full:>12.2f}{t_rand:>14.3f}{t_full / t_rand:>9.1f}x{e_full:>12.2e}{e_rand:>12.2e}")


if __name__ == "__main__":
    main()
