"""Seconds per 10⁸ entries to draw DARE / DELLA random masks and to apply DARE: the two previous draws
(before) vs the keyed 32-bit counter hash computed on the tensor's device (after), side by side in one run.

    python benchmarks/mask_speed.py [--entries 33554432] [--threads 2] [--repeat 5] [--devices cpu,cuda]

Columns, all reimplemented here as baselines except "after":

* ``torch.rand``: the first implementation, ``torch.rand`` from a CPU ``torch.Generator`` seeded with the
  seed, compared with the keep probability on CPU, then moved to the device;
* ``SplitMix64``: the previous counter-based draw, the top 24 bits of the SplitMix64 finaliser of
  ``key + (i + 1)·φ`` in int64 arithmetic over reused 2¹⁸-entry buffers;
* ``after``: :func:`llm_merging.ops.random_mask`, the draw inside :func:`llm_merging.ops.della_mask` (given
  the keep probabilities, computed the same way by every version and not timed), and
  :func:`llm_merging.ops.masks.dare_drop_`.

Rows: ``dare`` a bool mask; ``della`` a bool mask against per-entry keep probabilities; ``drop`` DARE as the
chunked merges apply it, in place on 2²⁰-entry chunks of a float32 tensor (drop + 1/p rescale): before =
the SplitMix64 bits drawn per chunk (fresh buffers, as ``dare_chunks`` did) and ``torch.where(mask, x/p,
0.0)``, torch.rand = the whole mask drawn first, then the same ``torch.where``. CUDA is measured when
available (``--devices`` default: cpu, plus cuda if there).

Then :func:`llm_merging.ops.streaming.dare_chunks` alone on three 32000×1024 float32 task vectors
(``--dare-shape``; density 0.5, TIES consensus, 1/p and mergekit's L1 rescale), with the previous mask
code patched into it (before) and as it is (after): everything else (the TIES kernels) is the same code.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_merging import ops
from llm_merging.ops._common import CounterScratch, counter_chunks
from llm_merging.ops.masks import dare_drop_

M64 = (1 << 64) - 1
PHI, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
CHUNK = 1 << 20  # the chunked merges' chunk


def s64(v: int) -> int:
    v &= M64
    return v - (1 << 64) if v >> 63 else v


def fmix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def splitmix_chunks(seed: int, n: int, start: int, device, step: int = 1 << 18):
    """The previous generator: ``(lo, hi, b)`` with b the top 24 bits of SplitMix64's finaliser of
    ``key(seed) + (i + 1)·φ`` (int64 ops; arithmetic shifts made logical by masks), reused buffers."""
    step = max(1, min(step, n))
    base = torch.arange(step, dtype=torch.int64, device=device).mul_(s64(PHI))
    z, t = torch.empty_like(base), torch.empty_like(base)
    key = fmix64((seed & M64) + PHI) + PHI
    for lo in range(start, start + n, step):
        count = min(step, start + n - lo)
        zc, tc = z[:count], t[:count]
        torch.add(base[:count], s64(key + lo * PHI), out=zc)
        for shift, mult in ((30, MIX1), (27, MIX2), (31, None)):
            torch.bitwise_right_shift(zc, shift, out=tc)
            tc.bitwise_and_((1 << (64 - shift)) - 1)
            zc.bitwise_xor_(tc)
            if mult is not None:
                zc.mul_(s64(mult))
        torch.bitwise_right_shift(zc, 40, out=zc)
        yield lo, lo + count, zc.bitwise_and_((1 << 24) - 1)


def rand_mask(shape, density: float, seed: int, device) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)
    return (u < density).to(device)


def rand_della(keep: torch.Tensor, seed: int) -> torch.Tensor:
    u = torch.rand(keep.shape, generator=torch.Generator(device="cpu").manual_seed(seed), dtype=torch.float32)
    return u.to(keep.device) < keep


def splitmix_mask(shape, density: float, seed: int, device) -> torch.Tensor:
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.bool, device=device)
    for lo, hi, b in splitmix_chunks(seed, n, 0, device):
        torch.lt(b, math.ceil(density * (1 << 24)), out=out[lo:hi])
    return out.reshape(shape)


def draw_against(keep: torch.Tensor, chunks) -> torch.Tensor:
    """The DELLA draw loop (as :func:`ops.della_mask`): ``b / 2²⁴ < keep`` chunk by chunk."""
    flat = keep.reshape(-1)
    mask = torch.empty(flat.numel(), dtype=torch.bool, device=keep.device)
    u = None
    for lo, hi, bits in chunks:
        if u is None:
            u = torch.empty(bits.shape, dtype=torch.float32, device=keep.device)
        uc = u[: hi - lo]
        uc.copy_(bits).mul_(2.0**-24)
        torch.lt(uc, flat[lo:hi], out=mask[lo:hi])
    return mask.reshape(keep.shape)


def rand_drop(x: torch.Tensor, density: float, seed: int) -> None:
    mask = rand_mask(x.shape, density, seed, x.device)
    for lo in range(0, x.numel(), CHUNK):
        x[lo : lo + CHUNK] = torch.where(mask[lo : lo + CHUNK], x[lo : lo + CHUNK] / density, 0.0)


def splitmix_drop(x: torch.Tensor, density: float, seed: int) -> None:
    limit = math.ceil(density * (1 << 24))
    for lo in range(0, x.numel(), CHUNK):
        count = min(CHUNK, x.numel() - lo)
        bits = torch.cat([b.clone() for _, _, b in splitmix_chunks(seed, count, lo, x.device)])  # fresh
        x[lo : lo + count] = torch.where(bits < limit, x[lo : lo + count] / density, 0.0)


def new_drop(x: torch.Tensor, density: float, seed: int, scratch: CounterScratch) -> None:
    for lo in range(0, x.numel(), CHUNK):
        dare_drop_(x[lo : lo + CHUNK], density, seed, start=lo, scratch=scratch)


class OldMasks:
    """The previous mask code inside :func:`llm_merging.ops.streaming.dare_chunks`, patched in for the
    "before" column: SplitMix64 bits drawn per chunk into fresh buffers, applied with
    ``torch.where(mask, x, 0.0)`` (plus one copy back into the chunk, ~2 % of a mask's cost)."""

    @staticmethod
    def _mask(density: float, seed: int, start: int, count: int, device) -> torch.Tensor:
        bits = next(splitmix_chunks(seed, count, start, device, step=count))[2]  # fresh buffers, one step
        return bits < math.ceil(density * (1 << 24))

    @classmethod
    def dare_drop_(cls, x, density, seed, *, start=0, inverse=True, scratch=None):
        m = cls._mask(density, seed, start, x.numel(), x.device)
        return x.copy_(torch.where(m, x / density if inverse else x, 0.0))

    @classmethod
    def random_mask_into_(cls, out, density, seed, *, start=0, chunk=None, scratch=None):
        return out.copy_(cls._mask(density, seed, start, out.numel(), out.device))

    @staticmethod
    def zero_dropped_(x, mask, chunk=None):
        return x.copy_(torch.where(mask, x, 0.0))


def time_dare_chunks(rows: int, cols: int, repeat: int) -> None:
    """``dare_chunks`` alone on three ``rows × cols`` float32 task vectors (density 0.5, TIES consensus), with
    the previous mask code patched in (before) and as it is (after), taking turns."""
    from llm_merging.ops import streaming

    n = rows * cols
    g = torch.Generator().manual_seed(2)
    tvs = [torch.randn(n, generator=g).mul_(1e-3) for _ in range(3)]

    def read(start: int, stop: int):
        return None, [t[start:stop] for t in tvs]

    def run(kw):
        for _ in streaming.dare_chunks(read, n, 0.5, [0.5, 0.3, 0.2], consensus="ties", seed=7, n_models=3, **kw):
            pass

    names = ("dare_drop_", "random_mask_into_", "zero_dropped_")
    current = {k: getattr(streaming, k) for k in names}

    def before(kw):
        for k in names:
            setattr(streaming, k, getattr(OldMasks, k))
        try:
            run(kw)
        finally:
            for k, v in current.items():
                setattr(streaming, k, v)

    print(f"dare_chunks on 3 task vectors of {rows}x{cols} float32, density 0.5, ties (seconds, best of {repeat})")
    for label, kw in (("rescale inverse", {"rescale": "inverse"}),
                      ("rescale l1, weighted_sign, no divisor (mergekit dare_ties)",
                       {"rescale": "l1", "weighted_sign": True, "divisor": None})):
        t_old, t_new = timed([lambda: before(kw), lambda: run(kw)], "cpu", repeat)
        print(f"  {label:<58} before {t_old:6.3f} s  after {t_new:6.3f} s  {t_old / t_new:5.1f}x")


def timed(fns, device: str, repeat: int) -> list[float]:
    """Best of ``repeat`` seconds for each, taking turns so all see the same machine load."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for j, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1 << 25, help="entries per mask (a 4096×8192 matrix)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--devices", default=None, help="comma-separated; default cpu (+ cuda when available)")
    p.add_argument("--dare-shape", default="32000x1024",
                   help="ROWSxCOLS of the dare_chunks timing on CPU (three task vectors); 'none' skips it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"]
    if not args.devices and torch.cuda.is_available():
        devices.append("cuda")
    n, seed, density = args.entries, ops.derive_seed(1234, 0), 0.3
    shape = (n // 4096, 4096) if n % 4096 == 0 else (n,)
    per = 1e8 / n
    print(f"seconds per 1e8 entries ({n} entries per mask, {args.threads} CPU threads, best of {args.repeat})")
    print(f"{'device':<7} {'row':<6} {'torch.rand':>11} {'SplitMix64':>11} {'after':>9} "
          f"{'vs SplitMix64':>14} {'vs rand':>8}")
    for dev in devices:
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(0)).mul_(0.4).add_(0.3).to(dev)
        x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dev)
        xs = [x.clone() for _ in range(3)]  # values do not matter for the timing; each fn has its own
        scratch = CounterScratch(dev)
        rows = [
            ("dare", [lambda: rand_mask(shape, density, seed, dev), lambda: splitmix_mask(shape, density, seed, dev),
                      lambda: ops.random_mask(shape, density, seed, dev)]),
            ("della", [lambda: rand_della(keep, seed),
                       lambda: draw_against(keep, splitmix_chunks(seed, keep.numel(), 0, keep.device)),
                       lambda: draw_against(keep, counter_chunks(seed, keep.numel(), keep.device))]),
            ("drop", [lambda: rand_drop(xs[0], density, seed), lambda: splitmix_drop(xs[1], density, seed),
                      lambda: new_drop(xs[2], density, seed, scratch)]),
        ]
        for name, fns in rows:
            t_rand, t_sm, t_new = (t * per for t in timed(fns, dev, args.repeat))
            print(f"{dev:<7} {name:<6} {t_rand:>9.3f} s {t_sm:>9.3f} s {t_new:>7.3f} s "
                  f"{t_sm / t_new:>13.1f}x {t_rand / t_new:>7.1f}x")
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ops.random_mask(shape, density, seed, dev)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"cuda   dare peak GPU memory of one mask draw: {extra:.0f} MiB (mask {n / 2**20:.0f} MiB)")
    if args.dare_shape != "none":
        rows, cols = (int(v) for v in args.dare_shape.lower().split("x"))
        time_dare_chunks(rows, cols, max(1, min(args.repeat, 3)))


if __name__ == "__main__":
    main()
