"""Sparsification masks and rescaling: magnitude top-k, DARE random drop, breadcrumbs, DELLA MagPrune.

Top-k convention (used by every magnitude-based mask here): keep exactly
``k = round(density · numel)`` entries (round half up; at least 1 when density > 0; all when density ≥ 1),
ordered by |x| descending and, among equal magnitudes, by flat index ascending. The order is a total
order, so the result is deterministic and identical on CPU and GPU, and the top-a set is contained in
the top-b set for a ≤ b. (PEFT and mergekit use ``k = int(density · numel)`` and leave ties to
``torch.topk``/``argsort``; the results agree whenever density·numel is an integer and there are no ties.
``keep_count="floor"`` gives mergekit's count: ``k = int(density · numel)`` (at least 1); ties at the
threshold still go to the lower flat index, where mergekit keeps whichever entries its sort returns, so
inputs with exact ties at the threshold (common in fp16) can still differ there.)

Random masks (DARE, DELLA) come from a counter-based generator computed on the tensor's own device:
entry i's uniform is ``u = b / 2²⁴`` with ``b`` the top 24 bits of a keyed 32-bit hash of i,
``lowbias32(lowbias32((i + k₁) mod 2³²) ⊕ k₂)`` (k₁, k₂ the two halves of a SplitMix64 output of the seed;
i the flat row-major index; see :func:`~llm_merging.ops._common.counter_hash`), and the entry is kept when
``u < keep probability``. It is a pure function of (seed, flat index) in int32 arithmetic (wrapping
multiply, xor, add, shift and mask), so one seed yields bit-identical masks on CPU and GPU, whatever the
chunking. Dropped entries are +0.0 and kept ones keep their exact bits (masks are applied as bitwise ANDs
on the float32 bit patterns: no ``torch.where``, no signed zeros from ``x · 0``).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import (
    COUNTER_CHUNK_CPU,
    COUNTER_CHUNK_DEVICE,
    KEEP_COUNTS,
    CounterScratch,
    check_choice,
    check_range,
    check_seed,
    counter_chunks,
    f32,
)
from llm_merging.ops._common import keep_count as _keep_count

RESCALES = ("inverse", "l1", None)
_L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor threshold
#: entries per block of :func:`abs_sum64` (chunks of the chunked merges are whole blocks)
BLOCK = 1 << 16


def abs_sum64(x: Tensor) -> list[float]:
    """float64 sums of |x| over consecutive blocks of :data:`BLOCK` flat entries (the last one possibly
    shorter). ``math.fsum`` of the blocks of all chunks of a tensor (chunks of whole blocks) is its L1 norm,
    the same however it was chunked."""
    flat = x.reshape(-1)
    sums = [flat[s : s + BLOCK].abs().sum(dtype=torch.float64) for s in range(0, flat.numel(), BLOCK)]
    return torch.stack(sums).tolist() if sums else []


def kth_largest(a: Tensor, k: int, use_topk: Optional[bool] = None) -> Tensor:
    """The k-th largest value of the 1-D tensor ``a`` (1 ≤ k ≤ numel).

    CPU: ``torch.kthvalue`` (quickselect). CUDA and other devices: ``torch.topk`` on the smaller side,
    because CUDA ``kthvalue`` runs one block per slice and is very slow on one huge slice
    (pytorch/pytorch#75599), while ``topk`` uses a multi-block radix select.
    """
    n = a.numel()
    if use_topk is None:
        use_topk = a.device.type != "cpu"
    if not use_topk:
        return torch.kthvalue(a, n - k + 1).values
    if k <= n - k + 1:
        return torch.topk(a, k, largest=True, sorted=False).values.min()
    return torch.topk(a, n - k + 1, largest=False, sorted=False).values.max()


def topk_flat(a: Tensor, k: int, use_topk: Optional[bool] = None) -> Tensor:
    """Boolean mask of the k largest entries of the 1-D tensor ``a`` (ties → lower index first)."""
    n = a.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    thr = kth_largest(a, k, use_topk)
    mask = a > thr
    need = k - int(mask.sum())
    if need > 0:
        eq = a == thr
        if int(eq.sum()) > need:
            eq &= torch.cumsum(eq, dim=0, dtype=torch.int32) <= need
        mask |= eq
    return mask


def magnitude_mask(x: Tensor, density: float, keep_count: str = "round") -> Tensor:
    """Boolean mask keeping the top ``round(density·numel)`` entries of ``x`` by magnitude
    (``keep_count="floor"``: ``int(density·numel)``, at least 1, as mergekit and PEFT).

    See the module docstring for the exact count and the tie rule. ``density`` in (0, 1].
    """
    d = check_range(density, "density", 0.0, 1.0, low_open=True)
    check_choice(keep_count, "keep_count", KEEP_COUNTS)
    n = x.numel()
    k = _keep_count(d, n, keep_count)
    return topk_flat(f32(x).detach().abs().reshape(-1), k).reshape(x.shape)


def keep_limit(density: float) -> int:
    """The DARE keep test's limit: entry kept when its 24-bit draw ``b < keep_limit(density)``, i.e.
    ``b / 2²⁴ < density`` (exact: density·2²⁴ is exact in float64)."""
    return math.ceil(density * (1 << 24))


def random_mask(
    shape: Union[torch.Size, tuple[int, ...]],
    density: float,
    seed: int,
    device: Union[str, torch.device, None] = None,
    *,
    chunk: Optional[int] = None,
) -> Tensor:
    """DARE mask: each entry kept independently with probability ``density`` (Bernoulli).

    Entry i is kept when ``u_i < density``, ``u_i = b_i / 2²⁴`` the counter-based uniform of (seed, flat
    index i) (module docstring), computed on ``device`` ``chunk`` entries at a time (default: by device):
    bit-identical on every device for a given seed; the keep probability is ``ceil(density·2²⁴) / 2²⁴``.
    """
    d = check_range(density, "density", 0.0, 1.0, low_open=True)
    s = check_seed(seed)
    if d >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    shape = torch.Size(shape)
    out = torch.empty(shape.numel(), dtype=torch.bool, device=device)
    random_mask_into_(out, d, s, chunk=chunk)
    return out.reshape(shape)


def random_mask_into_(
    out: Tensor, density: float, seed: int, *, start: int = 0, chunk: Optional[int] = None,
    scratch: Optional[CounterScratch] = None,
) -> Tensor:
    """:func:`random_mask` of the flat indices ``start … start + out.numel() − 1`` written into the 1-D bool
    tensor ``out`` (``scratch``: buffers reused across calls). density < 1, checked by the caller."""
    limit = keep_limit(density)
    for lo, hi, bits in counter_chunks(seed, out.numel(), out.device, chunk=chunk, start=start, scratch=scratch):
        torch.lt(bits, limit, out=out[lo - start : hi - start])
    return out


def dare_drop_(
    x: Tensor, density: float, seed: int, *, start: int = 0, inverse: bool = True,
    scratch: Optional[CounterScratch] = None,
) -> Tensor:
    """DARE in place on the contiguous float32 tensor ``x`` holding flat entries ``start … start + numel − 1``
    of a tensor: entries :func:`random_mask` drops become +0.0, kept ones ``x / density`` (``inverse``) or
    unchanged. The same values as ``apply_mask(x, random_mask(...), "inverse" or None, density)``, bit for
    bit, without a bool mask: the 24-bit draws become keep words (``(b − limit) >> 31``: all ones where kept)
    ANDed into the float bit patterns. density < 1, checked by the caller."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("dare_drop_: x must be a contiguous float32 tensor")
    limit = keep_limit(density)
    flat = x.view(-1)
    p = _divisor(density, x.device)
    for lo, hi, bits in counter_chunks(seed, flat.numel(), x.device, start=start, scratch=scratch):
        part = flat[lo - start : hi - start]
        if inverse:
            part.div_(p)
        part.view(torch.int32).bitwise_and_(bits.sub_(limit).bitwise_right_shift_(31))
    return x


def zero_dropped_(x: Tensor, mask: Tensor, chunk: Optional[int] = None) -> Tensor:
    """In place on the contiguous float32 tensor ``x``: +0.0 where the bool ``mask`` (same numel) is False,
    kept entries' bits untouched (as ``torch.where(mask, x, 0.0)``, several times faster on CPU: the mask
    becomes int32 words −1/0 in a small reused buffer, ANDed into the float bit patterns). ``chunk``:
    entries per step (default by device, as the counter hash's)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("zero_dropped_: x must be a contiguous float32 tensor")
    if mask.numel() != x.numel():
        raise ValueError(f"zero_dropped_: mask has {mask.numel()} entries, x {x.numel()}")
    xi, m = x.view(-1).view(torch.int32), mask.reshape(-1)
    n = xi.numel()
    if n == 0:
        return x
    if chunk is None:
        chunk = COUNTER_CHUNK_CPU if x.device.type == "cpu" else COUNTER_CHUNK_DEVICE
    buf = torch.empty(min(chunk, n), dtype=torch.int32, device=x.device)
    for lo in range(0, n, buf.numel()):
        hi = min(lo + buf.numel(), n)
        w = buf[: hi - lo]
        w.copy_(m[lo:hi]).neg_()
        xi[lo:hi].bitwise_and_(w)
    return x


def breadcrumbs_mask(x: Tensor, density: float, gamma: float, keep_count: str = "round") -> Tensor:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023): drop the ``gamma`` fraction of largest-magnitude
    entries (outliers) and the smallest ones, keeping ``round(density·numel)`` entries in between.

    Counts: ``n_top = round(gamma·n)`` outliers dropped, ``n_keep = round(density·n)`` kept (at least 1),
    ``n − n_keep − n_top`` smallest dropped; when density + gamma > 1 the number of outliers dropped is
    reduced to ``n − n_keep`` (as mergekit ``magnitude_outliers``). ``keep_count="floor"`` is mergekit
    0.1.5's count: ``n_top = int(gamma·n)``, ``n_keep = int(density·n)`` (possibly 0). density ≥ 1 keeps
    everything.
    """
    d = check_range(density, "density", 0.0, 1.0, low_open=True)
    g = check_range(gamma, "gamma", 0.0, 1.0, high_open=True)
    check_choice(keep_count, "keep_count", KEEP_COUNTS)
    n = x.numel()
    if d >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if keep_count == "floor":
        n_keep = _keep_count(d, n, "floor", at_least_one=False)
        n_top = min(int(g * n), n - n_keep)
    else:
        n_keep = _keep_count(d, n)
        n_top = min(int(math.floor(g * n + 0.5)), n - n_keep)
    a = f32(x).detach().abs().reshape(-1)
    mask = topk_flat(a, n_keep + n_top)
    if n_top > 0:
        mask &= ~topk_flat(a, n_top)
    return mask.reshape(x.shape)


def check_della(density: float, epsilon: float) -> tuple[float, float]:
    """Check DELLA's ``density`` and ``epsilon`` (keep probabilities within [0, 1]); return them as floats."""
    d = check_range(density, "density", 0.0, 1.0, low_open=True)
    e = check_range(epsilon, "epsilon", 0.0, 1.0)
    if d < 1.0 and (d - e < 0.0 or d + e > 1.0):
        raise ConfigError(
            f"epsilon: {e!r} puts keep probabilities [{d - e:g}, {d + e:g}] outside [0, 1] for density {d!r}"
        )
    return d, e


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def della_keep_probabilities(x: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities (Deep et al. 2024, mergekit ``della_magprune``).

    Within each row (dim 0 of a ≥2-D tensor, flattening the rest; a 1-D tensor is one row) entries are
    ranked by |x| (stable: equal magnitudes rank by index), and the keep probability rises linearly with
    the rank from ``density − ε`` (smallest magnitude) to ``density + ε`` (largest), i.e. the drop
    probability pᵢ runs from ``p + ε`` down to ``p − ε`` around p = 1 − density. A one-entry row gets
    ``density``. density ≥ 1 gives all ones (no pruning; ε is then ignored, as in mergekit).
    Keep probabilities outside [0, 1] are a :class:`ConfigError`.

    The paper spaces the probabilities over [p − ε/2, p + ε/2]; this follows mergekit's ±ε.
    """
    d, e = check_della(density, epsilon)
    if d >= 1.0:
        return torch.ones(x.shape, dtype=torch.float32, device=x.device)
    rows = _rows(f32(x).detach())
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=x.device).expand_as(order))
    del order
    # Probability per rank, computed once on CPU in float64 so every device uses the same float32 values.
    if m > 1:
        table = (d - e) + (2.0 * e) * torch.arange(m, dtype=torch.float64) / (m - 1)
    else:
        table = torch.full((1,), d, dtype=torch.float64)
    table = table.clamp(0.0, 1.0).to(torch.float32).to(x.device)
    return table[ranks].reshape(x.shape)


def della_mask(
    x: Tensor, density: float, epsilon: float, seed: int, *, chunk: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """DELLA drop mask and the keep probabilities it was drawn with: ``(mask, keep_prob)``.

    ``mask = u < keep_prob`` with ``u_i = b_i / 2²⁴`` (float32, exact) the counter-based uniform of
    (seed, flat index i) (module docstring), computed on ``x``'s device ``chunk`` entries at a time
    (default: by device): bit-identical on every device for a given seed, and the same uniforms as
    :func:`random_mask`'s.
    """
    keep = della_keep_probabilities(x, density, epsilon)
    s = check_seed(seed)
    if density >= 1.0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device), keep
    flat = keep.reshape(-1)
    n = flat.numel()
    mask = torch.empty(n, dtype=torch.bool, device=x.device)
    u = None
    for start, stop, bits in counter_chunks(s, n, x.device, chunk=chunk):
        if u is None:
            u = torch.empty(bits.shape, dtype=torch.float32, device=x.device)
        uc = u[: stop - start]
        uc.copy_(bits).mul_(2.0**-24)  # exact: b < 2²⁴
        torch.lt(uc, flat[start:stop], out=mask[start:stop])
    return mask.reshape(x.shape), keep


def _divisor(value: float, device) -> Tensor:
    """``value`` as a 0-dim float32 tensor on ``device``: dividing by it is a true division on every device
    (CUDA divides by a Python or CPU scalar as a multiplication by its reciprocal, one bit off at times),
    and on the CPU the same bits as dividing by the float."""
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def apply_mask(
    x: Tensor,
    mask: Tensor,
    rescale: Optional[str] = None,
    keep_prob: Union[float, Tensor, None] = None,
) -> Tensor:
    """``x`` with dropped entries zeroed and the kept ones rescaled.

    ``rescale``: ``"inverse"`` divides kept entries by their keep probability (DARE 1/p, DELLA 1/(1−pᵢ));
    ``"l1"`` scales the result so its L1 norm equals that of ``x`` (mergekit ``rescale=True``; skipped when
    either norm is below 1e-7, as mergekit); ``None`` no rescaling. Returns a new float32 tensor.
    The L1 norms are float64 sums of fixed blocks (:func:`abs_sum64`), as the chunked DARE's.
    """
    check_choice(rescale, "rescale", RESCALES)
    xf = f32(x)
    if rescale == "inverse":
        if keep_prob is None:
            raise ConfigError("keep_prob: required for rescale='inverse'")
        p = keep_prob if isinstance(keep_prob, Tensor) else _divisor(keep_prob, xf.device)
        out = torch.div(xf, p).contiguous()
    else:
        out = xf.clone(memory_format=torch.contiguous_format)
    masked = zero_dropped_(out, mask)
    if rescale == "l1":
        l1_rescale_(masked, math.fsum(abs_sum64(xf)), math.fsum(abs_sum64(masked)))
    return masked


def l1_rescale_(x: Tensor, before: float, after: float) -> Tensor:
    """In place: ``x · (before / after)`` (mergekit's L1 rescale of a pruned vector, norm ``after``, to the
    original's norm ``before``), skipped when either norm is below 1e-7."""
    if before >= _L1_EPS and after >= _L1_EPS:
        x.mul_(before / after)
    return x
