"""Chunked forms of the merges whose memory matters at real shapes: the merged task vector of one tensor
computed a flat range of entries at a time, from a reader of the inputs' ranges.

``read(start, stop)`` returns ``(base, task_vectors)`` for the flat entries ``start … stop − 1`` (float32,
1-D, one task vector per model; ``base`` is θ₀ there; they may be views of a cache, so nothing here
modifies them). The functions here call it as often as they need
(one pass per whole-tensor statistic, then one to merge) and yield ``(start, stop, merged)`` in order;
``chunk`` (entries per range, a multiple of :data:`BLOCK`) sets the memory: a few float32 buffers of
``chunk`` entries per model, never a whole tensor.

Every function gives, bit for bit and whatever ``chunk``, the flat result of its whole-tensor counterpart:

* :func:`magnitude_prune_chunks` (``ties`` with ``consensus="ties"``) = :func:`~llm_merging.ops.sparsify.magnitude_prune`:
  the top-k thresholds are exact selections over the whole tensor (:func:`magnitude_thresholds`, counting
  passes over the float32 bit patterns of |τ|), ties at the threshold go to the lowest flat indices as
  :func:`~llm_merging.ops.masks.magnitude_mask`, and the rest is elementwise (arithmetic passes: see
  :class:`_TopKTrim` and :func:`~llm_merging.ops.consensus.consensus_merge`);
* :func:`dare_chunks` = :func:`~llm_merging.ops.sparsify.dare`: the counter-based masks are functions of
  the flat index; the L1 rescale's norms are sums of fixed blocks (:func:`~llm_merging.ops.masks.abs_sum64`)
  and its masks are kept between its two passes (one byte per entry and model);
* :func:`elementwise_chunks`: any function whose entry j depends only on entry j of its inputs (linear,
  task arithmetic).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from llm_merging.ops._common import (
    KEEP_COUNTS,
    CounterScratch,
    PerModel,
    check_choice,
    check_seed,
    derive_seed,
    keep_count,
    per_model,
    stack_f32,
    weight_list,
)
from llm_merging.ops.consensus import Buffers, combine, common_checks
from llm_merging.ops.masks import BLOCK, RESCALES, abs_sum64, dare_drop_, l1_rescale_, random_mask_into_, zero_dropped_

Reader = Callable[[int, int], "tuple[Tensor, list[Tensor]]"]
Chunks = Iterator["tuple[int, int, Tensor]"]

#: default entries per chunk on the CPU (4 MiB float32 buffers: they stay in the allocator's heap)
CHUNK = 1 << 20


def reader_chunk(read: Reader) -> int:
    """Entries per chunk a reader asks for (its ``chunk`` attribute; :data:`CHUNK` without one)."""
    return int(getattr(read, "chunk", CHUNK))


def chunk_ranges(n: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges covering ``0 … n − 1``; ``chunk`` must be a multiple of BLOCK."""
    if chunk <= 0 or chunk % BLOCK:
        raise ValueError(f"chunk: {chunk!r} is not a positive multiple of {BLOCK}")
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _bits(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """The int32 bit patterns of |x| (float32; into the float32 buffer ``out`` when given): for non-negative
    floats they sort as the values do."""
    return torch.abs(x, out=out).view(torch.int32)


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin b holding the k-th largest entry of a histogram, and the number of entries above b."""
    above = torch.cumsum(hist.flip(0), 0)  # above[j]: entries in the top j+1 bins
    j = int(torch.searchsorted(above, torch.tensor([k], dtype=above.dtype, device=above.device)).item())
    b = hist.numel() - 1 - j
    return b, int(above[j]) - int(hist[b])


#: high 16 bits of +inf: bins from here on hold the non-finite |τ| (inf, NaN)
_NONFINITE_BIN = 0x7F80
#: tensors of at least this many entries find their thresholds from a sample first (every
#: ``_SAMPLE_STRIDE``-th entry), then one exact pass over a window of at most ``_WINDOW_BINS`` bins
_SAMPLE_FROM = 1 << 18
_SAMPLE_STRIDE = 8
_WINDOW_BINS = 4


def _high_hist(x: Tensor, buf: Buffers, tag: str) -> Tensor:
    """Histogram of the high 16 bits of |x| (2^15 bins: the sign bit is 0)."""
    f, idx = buf(tag + "abs", x), buf(tag + "key", x, torch.int64)
    idx.copy_(_bits(x, f).bitwise_right_shift_(16))  # bincount counts int64 without a copy
    return torch.bincount(idx, minlength=1 << 15)


def _window_pass(read: Reader, ranges, windows: dict, buf: Buffers) -> tuple[dict, dict]:
    """One pass: per model i with ``windows[i] = (lo, width)``, the histogram ``h`` of its |τᵢ| bit patterns
    with h[0] the entries below ``lo``, h[1 + j] those equal to ``lo + j`` (j < width) and h[width + 1]
    those above; and Σ|τᵢ| (not finite when an entry is not)."""
    hists: dict[int, Tensor] = {}
    sums: dict[int, Tensor] = {}
    for start, stop in ranges:
        _, tvs = read(start, stop)
        for i, (lo, width) in windows.items():
            # bits − (lo − 1) clamped to [0, width + 1]: exact integer arithmetic, no select of the window
            f, idx = buf("abs", tvs[i]), buf("key", tvs[i], torch.int64)
            bits = _bits(tvs[i], f)
            total = f.sum()
            bits.clamp_(lo - 1, min(lo + width, (1 << 31) - 1)).sub_(lo - 1)
            h = torch.bincount(idx.copy_(bits), minlength=width + 2)
            hists[i] = h if i not in hists else hists[i].add_(h)
            sums[i] = total if i not in sums else sums[i].add_(total)
    return hists, sums


def _resolve(h: Tensor, lo: int, width: int, k: int) -> Optional[tuple[float, int]]:
    """``(t, need)`` from a window histogram of :func:`_window_pass`, or None when the k-th largest bit
    pattern is not inside the window."""
    above, inside = int(h[width + 1]), h[1 : width + 1]
    if not above < k <= above + int(inside.sum()):
        return None
    j, above_j = _pick(inside, k - above)
    t = torch.tensor([lo + j], dtype=torch.int32).view(torch.float32).item()
    return t, k - above - above_j


def _sample_window(hist: Tensor, k: int, n: int) -> Optional[tuple[int, int]]:
    """A window ``(lo, width)`` of whole high-16 bins that holds the k-th largest of the n entries with
    near certainty, from the histogram ``hist`` of a sample; None when it would span too many bins."""
    m = int(hist.sum())
    q = k / n
    spread = 6.0 * math.sqrt(m * q * (1.0 - q)) + 16.0  # > 6 binomial standard deviations
    rank_hi = max(1, int(math.floor(q * m - spread)))
    rank_lo = min(m, int(math.ceil(q * m + spread)))
    if m == 0 or rank_hi > rank_lo:
        return None
    b_hi, b_lo = _pick(hist, rank_hi)[0], _pick(hist, rank_lo)[0]
    if b_hi - b_lo + 1 > _WINDOW_BINS:
        return None
    return b_lo << 16, (b_hi - b_lo + 1) << 16


def _thresholds(read: Reader, n: int, ks: Sequence[int], chunk: int) -> tuple[list, list[bool]]:
    """:func:`magnitude_thresholds`, and per model whether its |τ| may have non-finite entries.

    Large tensors: a histogram of the high 16 bits of every ``_SAMPLE_STRIDE``-th entry (a strided pass:
    little arithmetic) places the k-th largest within a few bins, and one exact pass over those bins
    finds it (checked: the counts above and inside the window are exact); a model whose window misses, and
    every model of a small tensor, takes the two-pass radix select (exact high-16 histogram, then the
    low 16 bits inside the chosen bin). Either way t and need are exact."""
    todo = [i for i, k in enumerate(ks) if k < n]
    out: list[Optional[tuple[float, int]]] = [None] * len(ks)
    nonfinite = [False] * len(ks)
    if not todo:
        return out, nonfinite
    ranges = chunk_ranges(n, chunk)
    buf = Buffers()
    if n >= _SAMPLE_FROM:
        sample: dict[int, Tensor] = {}
        for start, stop in ranges:
            _, tvs = read(start, stop)
            for i in todo:
                h = _high_hist(tvs[i][::_SAMPLE_STRIDE], buf, "sample")
                sample[i] = h if i not in sample else sample[i].add_(h)
        windows = {i: w for i in todo if (w := _sample_window(sample[i], ks[i], n)) is not None}
        if windows:
            hists, sums = _window_pass(read, ranges, windows, buf)
            for i, (lo, width) in windows.items():
                out[i] = _resolve(hists[i], lo, width, ks[i])
                nonfinite[i] = not bool(torch.isfinite(sums[i]))
        todo = [i for i in todo if out[i] is None]
        if not todo:
            return out, nonfinite
    hist: dict[int, Tensor] = {}
    for start, stop in ranges:  # pass 1: exact histogram of the high 16 bits
        _, tvs = read(start, stop)
        for i in todo:
            h = _high_hist(tvs[i], buf, "")
            hist[i] = h if i not in hist else hist[i].add_(h)
    for i in todo:
        nonfinite[i] = bool(hist[i][_NONFINITE_BIN:].any())
    # pass 2: the low 16 bits inside the chosen bin b (the window of bin b holds the k-th largest)
    windows = {i: (_pick(hist[i], ks[i])[0] << 16, 1 << 16) for i in todo}
    hists, _ = _window_pass(read, ranges, windows, buf)
    for i, (lo, width) in windows.items():
        out[i] = _resolve(hists[i], lo, width, ks[i])
    return out, nonfinite


def magnitude_thresholds(read: Reader, n: int, ks: Sequence[int], chunk: int = CHUNK) -> list[Optional[tuple[float, int]]]:
    """Per model i, ``(t, need)``: t the ``ks[i]``-th largest |τᵢ| over the whole tensor and ``need`` how many
    entries equal to t the top-``ks[i]`` set takes (those with the lowest flat indices); None when
    ``ks[i] >= n`` (everything kept). Exact, in two passes over the inputs: a radix select on the bit
    patterns (high 16 bits, then the low 16 bits inside the chosen bin), or for a tensor of at least
    ``_SAMPLE_FROM`` entries a strided sample's histogram, then an exact count over the few bins it
    points at (four passes when that window misses: the sample, the window, then the two radix passes)."""
    return _thresholds(read, n, ks, chunk)[0]


class _TopKTrim:
    """The top-k trim of one model over consecutive chunks: x where |x| > t, the first ``need`` entries with
    |x| = t in flat order (the running count carries across chunks), +0.0 elsewhere (float32).

    ``torch.hardshrink(x, λ)`` keeps x where |x| > λ and gives +0.0 elsewhere, in one pass: λ = t keeps
    |x| > t, λ = the float below t keeps |x| >= t. Only the chunk where the count of ties runs out needs a
    mask. Exceptions: with t = 0 the entries equal to t are zeros, dropped as +0.0 instead of kept as
    they are (only a −0.0 differs: a zero never takes part in the TIES election, and in a plain sum it
    can change the sign of a zero result only, so of a saved weight only where θ₀ = −0.0); a task vector with inf or NaN takes the compare-and-select form
    (hardshrink's vector and scalar loops disagree on NaN).
    """

    def __init__(self, threshold: float, need: int, nonfinite: bool = False) -> None:
        self.t, self.left, self.masked = threshold, need, nonfinite
        t32 = torch.tensor(threshold, dtype=torch.float32)
        self.below = torch.nextafter(t32, torch.zeros_like(t32)).item()

    def _mask(self, x: Tensor) -> Tensor:
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

    def __call__(self, x: Tensor, out: Tensor, buf: Buffers) -> Tensor:
        """The trimmed chunk ``x``, in ``out`` (or a new tensor); ``buf`` lends the temporaries."""
        if self.masked:
            return torch.where(self._mask(x), x, 0.0)
        if self.left <= 0 or self.t == 0.0:
            return torch.hardshrink(x, self.t, out=out)
        ge = torch.hardshrink(x, self.below, out=out)
        gt = torch.hardshrink(x, self.t, out=buf("above", x))
        ties = torch.sub(ge, gt, out=buf("ties", x))  # ±t at the entries equal to t, 0 elsewhere (exact)
        if ties.numel() <= 1 << 24:  # a float32 sum of at most 2^24 ones is exact
            count = int(torch.sign(ties, out=ties).abs_().sum())
        else:
            count = int(torch.count_nonzero(ties))
        if count <= self.left:
            self.left -= count
            return ge
        keep = ties.ne_(0.0).to(torch.bool)
        keep &= torch.cumsum(keep, dim=0, dtype=torch.int32) <= self.left
        self.left = 0
        return torch.where(keep, x, gt)


def magnitude_prune_chunks(
    read: Reader,
    n: int,
    density: PerModel,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    *,
    n_models: int,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    keep_count_mode: str = "round",
    chunk: int = CHUNK,
) -> Chunks:
    """:func:`~llm_merging.ops.sparsify.magnitude_prune` (and with ``consensus="ties"``,
    :func:`~llm_merging.ops.ties.ties`) in chunks: three passes over the inputs (two for the thresholds,
    see :func:`magnitude_thresholds`); every temporary of a chunk reuses the previous chunk's memory."""
    lam = common_checks(consensus, sign_method, divisor, scale)
    check_choice(keep_count_mode, "keep_count", KEEP_COUNTS)
    dens = per_model(density, n_models, "density", 0.0, 1.0, low_open=True)
    w = weight_list(weights, n_models)
    ks = [keep_count(d, n, keep_count_mode) if d < 1.0 else n for d in dens]
    thresholds, nonfinite = _thresholds(read, n, ks, chunk)
    trims = [None if t is None else _TopKTrim(*t, nonfinite[i]) for i, t in enumerate(thresholds)]
    buf = Buffers()  # every temporary of a chunk reuses the previous chunk's memory; the yield is new
    for start, stop in chunk_ranges(n, chunk):
        _, tvs = read(start, stop)
        # the trimmed vectors (copies: the merge overwrites them; dropped entries +0.0), no stack
        trimmed = [buf(("trim", i), t).copy_(t) if m is None else m(t, buf(("trim", i), t), buf)
                   for i, (t, m) in enumerate(zip(tvs, trims))]
        del tvs
        yield start, stop, combine(trimmed, w, lam, consensus, sign_method, weighted_sign, divisor, buf)


def ties_chunks(read: Reader, n: int, density: PerModel = 0.2, weights: Optional[PerModel] = None, scale: float = 1.0,
                *, n_models: int, sign_method: str = "total", weighted_sign: bool = False,
                divisor: Optional[str] = "count", keep_count_mode: str = "round", chunk: int = CHUNK) -> Chunks:
    """:func:`~llm_merging.ops.ties.ties` in chunks (see :func:`magnitude_prune_chunks`)."""
    return magnitude_prune_chunks(read, n, density, weights, scale, "ties", n_models=n_models,
                                  sign_method=sign_method, weighted_sign=weighted_sign, divisor=divisor,
                                  keep_count_mode=keep_count_mode, chunk=chunk)


def dare_chunks(
    read: Reader,
    n: int,
    density: PerModel,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    rescale: Optional[str] = "inverse",
    seed: int = 0,
    sign_method: str = "total",
    *,
    n_models: int,
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    chunk: int = CHUNK,
) -> Chunks:
    """:func:`~llm_merging.ops.sparsify.dare` in chunks: one pass (two with ``rescale="l1"``, whose norms
    need the whole tensor)."""
    lam = common_checks(consensus, sign_method, divisor, scale)
    check_choice(rescale, "rescale", RESCALES)
    s = check_seed(seed)
    dens = per_model(density, n_models, "density", 0.0, 1.0, low_open=True)
    w = weight_list(weights, n_models)
    seeds = [derive_seed(s, i) for i in range(n_models)]
    scratch: dict = {}  # the hash's buffers, one set per device, reused by every chunk

    def buffers(device) -> CounterScratch:
        device = torch.device(device)
        if device not in scratch:
            scratch[device] = CounterScratch(device)
        return scratch[device]

    norms: list[Optional[tuple[float, float]]] = [None] * n_models
    kept: dict[int, list] = {}  # the L1 pass's masks (one byte per entry and model), reused by the merge pass
    if rescale == "l1":
        before: list[list[float]] = [[] for _ in range(n_models)]
        after: list[list[float]] = [[] for _ in range(n_models)]
        copy: Optional[Tensor] = None  # one float32 buffer for the masked copies, reused
        for start, stop in chunk_ranges(n, chunk):
            _, tvs = read(start, stop)
            device = tvs[0].device
            ms: list[Optional[Tensor]] = []
            for i, d in enumerate(dens):
                if d >= 1.0:
                    ms.append(None)
                    continue
                m = torch.empty(stop - start, dtype=torch.bool, device=device)
                ms.append(random_mask_into_(m, d, seeds[i], start=start, scratch=buffers(device)))
                if copy is None or copy.numel() < stop - start or copy.device != device:
                    copy = torch.empty(stop - start, dtype=torch.float32, device=device)
                x = copy[: stop - start].copy_(tvs[i].reshape(-1))  # float32, as the whole-tensor path
                before[i] += abs_sum64(x)
                after[i] += abs_sum64(zero_dropped_(x, m))
            kept[start] = ms
        norms = [None if d >= 1.0 else (math.fsum(before[i]), math.fsum(after[i])) for i, d in enumerate(dens)]
    for start, stop in chunk_ranges(n, chunk):
        _, tvs = read(start, stop)
        stacked = stack_f32(tvs)
        del tvs
        ms = kept.pop(start) if kept else None
        for i, d in enumerate(dens):
            if d >= 1.0:
                continue
            x = stacked[i].view(-1)
            if ms is None:  # no rescale or 1/p: the masks are keep words ANDed in, no bool mask
                dare_drop_(x, d, seeds[i], start=start, inverse=rescale == "inverse", scratch=buffers(x.device))
            else:
                l1_rescale_(zero_dropped_(x, ms[i]), *norms[i])
        yield start, stop, combine(stacked, w, lam, consensus, sign_method, weighted_sign, divisor)


def elementwise_chunks(read: Reader, n: int, fn: Callable[[Tensor, list[Tensor]], Tensor], chunk: int = CHUNK) -> Chunks:
    """``fn(base, task_vectors)`` chunk by chunk, for an ``fn`` whose every entry depends only on the same
    entry of its inputs (then the chunks are the flat whole-tensor result, bit for bit)."""
    for start, stop in chunk_ranges(n, chunk):
        base, tvs = read(start, stop)
        yield start, stop, fn(base, tvs)
