"""Seconds per 10⁸ entries to draw DARE / DELLA random masks: the old CPU-generator draw (before) vs the
counter-based hash computed on the tensor's device (after), side by side in one run.

    python benchmarks/mask_speed.py [--entries 33554432] [--threads 2] [--repeat 5] [--devices cpu,cuda]

"before" is the previous implementation, reimplemented here as the baseline: ``torch.rand`` from a CPU
``torch.Generator`` seeded with the seed, compared with the keep probability on CPU, then moved to the
device. "after" is :func:`llm_merging.ops.random_mask` / the draw inside
:func:`llm_merging.ops.della_mask` (given the keep probabilities, which both versions compute the same
way and are not timed). CUDA is measured when available (``--devices`` default: cpu, plus cuda if there).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_merging import ops
from llm_merging.ops._common import counter_chunks


def old_random_mask(shape, density: float, seed: int, device) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)
    return (u < density).to(device)


def old_della_draw(keep: torch.Tensor, seed: int) -> torch.Tensor:
    u = torch.rand(keep.shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)
    return u.to(keep.device) < keep


def new_della_draw(keep: torch.Tensor, seed: int) -> torch.Tensor:
    """The draw of :func:`ops.della_mask` once the keep probabilities are known (same loop)."""
    flat = keep.reshape(-1)
    n = flat.numel()
    mask = torch.empty(n, dtype=torch.bool, device=keep.device)
    u = None
    for start, stop, bits in counter_chunks(seed, n, keep.device):
        if u is None:
            u = torch.empty(bits.shape, dtype=torch.float32, device=keep.device)
        uc = u[: stop - start]
        uc.copy_(bits).mul_(2.0**-24)
        torch.lt(uc, flat[start:stop], out=mask[start:stop])
    return mask.reshape(keep.shape)


def timed_pair(old, new, device: str, repeat: int) -> tuple[float, float]:
    """Best of ``repeat`` seconds for each, alternating old and new so both see the same machine load."""
    old(), new()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for j, fn in enumerate((old, new)):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best[0], best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1 << 25, help="entries per mask (a 4096×8192 matrix)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--devices", default=None, help="comma-separated; default cpu (+ cuda when available)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"]
    if not args.devices and torch.cuda.is_available():
        devices.append("cuda")
    n, seed, density = args.entries, ops.derive_seed(1234, 0), 0.3
    shape = (n // 4096, 4096) if n % 4096 == 0 else (n,)
    per = 1e8 / n
    print(f"mask seconds per 1e8 entries ({n} entries per mask, {args.threads} CPU threads, "
          f"best of {args.repeat})")
    print(f"{'device':<7} {'mask':<6} {'before (CPU generator)':>23} {'after (counter hash)':>21} {'speed-up':>9}")
    for dev in devices:
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)).mul_(0.4).add_(0.3).to(dev)
        rows = [
            (
                "dare",
                lambda: old_random_mask(shape, density, seed, dev),
                lambda: ops.random_mask(shape, density, seed, dev),
            ),
            ("della", lambda: old_della_draw(keep, seed), lambda: new_della_draw(keep, seed)),
        ]
        for name, old, new in rows:
            t_old, t_new = (t * per for t in timed_pair(old, new, dev, args.repeat))
            print(f"{dev:<7} {name:<6} {t_old:>21.3f} s {t_new:>19.3f} s {t_old / t_new:>8.1f}x")
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ops.random_mask(shape, density, seed, dev)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"cuda   dare peak GPU memory of one mask draw: {extra:.0f} MiB (mask {n / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
