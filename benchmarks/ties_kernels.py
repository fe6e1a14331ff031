"""Seconds for one TIES merge of a 32000×1024 tensor (three fp16-like task vectors, 1 CPU thread): the
previous kernels (frozen here as the baseline) vs the current ones, side by side in one run, with a check
that both give the same result bit for bit.

    python benchmarks/ties_kernels.py [--rows 32000] [--cols 1024] [--threads 1] [--repeat 3]

The task vectors look like fp16 fine-tune deltas: θᵢ = θ₀ + 0.01·noise, θ₀ and θᵢ rounded to fp16, τᵢ
computed in float32 (many exact ties at the top-k threshold). The merge is mergekit 0.1.5's ``ties``:
density 0.5, ``keep_count="floor"``, ``weighted_sign=True``, ``divisor="weight_sum"``. Timed: the chunked
path :func:`llm_merging.ops.streaming.ties_chunks` (2²⁰-entry chunks from a plain slicing ``read``, as the
engine's large tensors take), its threshold pass :func:`~llm_merging.ops.streaming.magnitude_thresholds`
alone, and the whole-tensor :func:`llm_merging.ops.ties`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_merging import ops  # noqa: E402
from llm_merging.ops import streaming as st  # noqa: E402
from llm_merging.ops._common import keep_count, stack_f32  # noqa: E402
from llm_merging.ops.masks import topk_flat  # noqa: E402  (the kthvalue top-k, unchanged)


# ----------------------------------------------------------------------------- baseline (previous code)
def old_consensus_merge(stacked: Tensor, w: Sequence[float], *, sign_method="total", weighted_sign=False,
                        divisor="count") -> Tensor:
    if weighted_sign:
        for i, wi in enumerate(w):
            stacked[i].mul_(wi)
    votes = [stacked[i] if sign_method == "total" else torch.sign(stacked[i]) for i in range(stacked.shape[0])]
    score = votes[0].clone()
    for v in votes[1:]:
        score.add_(v)
    del votes
    gamma = torch.where(score >= 0, 1.0, -1.0).to(torch.float32)
    del score
    num = den = None
    for i, wi in enumerate(w):
        agree = (stacked[i] * gamma) > 0
        term = torch.where(agree, stacked[i] if weighted_sign else stacked[i] * wi, 0.0)
        num = term if num is None else num.add_(term)
        if divisor == "count":
            den = agree.to(torch.float32) if den is None else den.add_(agree)
        elif divisor == "weight_sum":
            term = torch.where(agree, wi, 0.0)
            den = term if den is None else den.add_(term)
    if divisor == "count":
        return num / den.clamp_min(1.0)
    if divisor == "weight_sum":
        return num / torch.where(den == 0, 1.0, den)
    return num


def _old_bits(x: Tensor) -> Tensor:
    return x.abs().view(torch.int32)


def _old_pick(hist: Tensor, k: int) -> tuple[int, int]:
    above = torch.cumsum(hist.flip(0), 0)
    j = int(torch.searchsorted(above, torch.tensor([k], dtype=above.dtype)).item())
    b = hist.numel() - 1 - j
    return b, int(above[j]) - int(hist[b])


def old_magnitude_thresholds(read, n: int, ks: Sequence[int], chunk: int) -> list[Optional[tuple[float, int]]]:
    todo = [i for i, k in enumerate(ks) if k < n]
    out: list = [None] * len(ks)
    ranges = st.chunk_ranges(n, chunk)
    hist: dict = {}
    for start, stop in ranges:
        _, tvs = read(start, stop)
        for i in todo:
            h = torch.bincount(torch.bitwise_right_shift(_old_bits(tvs[i]), 16), minlength=1 << 15)
            hist[i] = h if i not in hist else hist[i].add_(h)
    picks = {i: _old_pick(hist[i], ks[i]) for i in todo}
    low: dict = {}
    for start, stop in ranges:
        _, tvs = read(start, stop)
        for i in todo:
            bits = _old_bits(tvs[i])
            sel = bits[torch.bitwise_right_shift(bits, 16) == picks[i][0]].bitwise_and_(0xFFFF)
            h = torch.bincount(sel, minlength=1 << 16)
            low[i] = h if i not in low else low[i].add_(h)
    for i in todo:
        b, above_bin = picks[i]
        lo, above_lo = _old_pick(low[i], ks[i] - above_bin)
        t = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
        out[i] = (t, ks[i] - above_bin - above_lo)
    return out


class _OldTopKMask:
    def __init__(self, threshold: float, need: int) -> None:
        self.t, self.left = threshold, need

    def __call__(self, x: Tensor) -> Tensor:
        a = x.abs()
        mask = a > self.t
        if self.left > 0:
            eq = a == self.t
            count = int(eq.sum())
            if count > self.left:
                eq &= torch.cumsum(eq, dim=0, dtype=torch.int32) <= self.left
                count = self.left
            mask |= eq
            self.left -= count
        return mask


def old_ties_chunks(read, n, density, w, *, chunk, keep_count_mode, **kw):
    ks = [keep_count(density, n, keep_count_mode)] * len(w)
    masks = [_OldTopKMask(*t) for t in old_magnitude_thresholds(read, n, ks, chunk)]
    for start, stop in st.chunk_ranges(n, chunk):
        _, tvs = read(start, stop)
        stacked = torch.stack([torch.where(m(t), t, 0.0) for t, m in zip(tvs, masks)])
        yield start, stop, old_consensus_merge(stacked, w, **kw)


def old_ties(tvs, density, w, *, keep_count_mode, **kw):
    stacked = stack_f32(tvs)
    for i in range(len(tvs)):
        k = keep_count(density, stacked[i].numel(), keep_count_mode)
        stacked[i].masked_fill_(~topk_flat(stacked[i].abs().reshape(-1), k).reshape(stacked[i].shape), 0.0)
    return old_consensus_merge(stacked, w, **kw)


# ----------------------------------------------------------------------------------------------- harness
def fp16_task_vectors(rows: int, cols: int, n: int = 3, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).half()
    tvs = []
    for _ in range(n):
        theta = (base.float() + 0.01 * torch.randn(rows, cols, generator=g)).half()
        tvs.append(theta.float() - base.float())
    return tvs


def collect(chunks, n: int, out: Tensor) -> Tensor:
    """The chunks written into ``out`` (allocated and touched once, outside the timing)."""
    for s, e, m in chunks:
        out[s:e] = m
    return out


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32000)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk", type=int, default=st.CHUNK)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tvs = fp16_task_vectors(args.rows, args.cols)
    n = tvs[0].numel()
    flat = [t.reshape(-1) for t in tvs]

    def read(s, e):
        return None, [t[s:e] for t in flat]

    w = [0.5, 0.3, 0.2]
    dens = 0.5
    kw = {"weighted_sign": True, "divisor": "weight_sum"}
    ks = [keep_count(dens, n, "floor")] * 3
    out_old, out_new = torch.zeros(n), torch.zeros(n)
    print(f"TIES, {args.rows}×{args.cols} float32 task vectors ×3 (fp16 deltas), density {dens}, "
          f"keep_count floor, weighted_sign, divisor weight_sum; {args.threads} thread(s), best of {args.repeat}")
    print(f"{'':34s}{'before s':>10s}{'after s':>10s}{'ratio':>8s}  same")
    rows = [
        ("magnitude_thresholds",
         lambda: old_magnitude_thresholds(read, n, ks, args.chunk),
         lambda: st.magnitude_thresholds(read, n, ks, args.chunk)),
        ("ties_chunks",
         lambda: collect(old_ties_chunks(read, n, dens, w, chunk=args.chunk, keep_count_mode="floor", **kw), n,
                         out_old),
         lambda: collect(st.ties_chunks(read, n, dens, w, n_models=3, chunk=args.chunk, keep_count_mode="floor",
                                        **kw), n, out_new)),
        ("ops.ties (whole tensor)",
         lambda: old_ties(tvs, dens, w, keep_count_mode="floor", **kw).reshape(-1),
         lambda: ops.ties(tvs, dens, w, keep_count="floor", **kw).reshape(-1)),
    ]
    for name, old, new in rows:
        t_old, r_old = best_of(old, args.repeat)
        t_new, r_new = best_of(new, args.repeat)
        same = torch.equal(r_old, r_new) if isinstance(r_old, Tensor) else r_old == r_new
        print(f"{name:34s}{t_old:10.3f}{t_new:10.3f}{t_old / t_new:8.2f}  {same}")


if __name__ == "__main__":
    main()
