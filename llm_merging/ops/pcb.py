"""PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging", arXiv:2410.02396).

Every function takes task vectors τᵢ = θᵢ − θ₀ of one tensor and returns the merged task vector (float32, on
the inputs' device; the caller adds θ₀). Nothing here is random. The authors' reference code works on the whole model flattened into one
vector; here each tensor is its own vector (as every method of :mod:`llm_merging.ops`), so PCB's quantiles
and min-max normalisations are per tensor.

Reference read (reimplemented, not copied): ``duguodong7/pcb-merging`` @ 31fa2dc (``pcb-merging.py``:
``PCB_merge``, ``clamp``, ``normalize``; ``nlp_source_code/merging.py``: ``get_score`` for the per-task λ).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.ops._common import PerModel, check_range, check_real, check_tensors, stack_f32, weight_list
from llm_merging.ops.masks import kth_largest

#: PCB's default clamp of |τ| (fraction clipped at each end, per task): ``pcb-merging.py``'s ``PCB_merge``
PCB_CLAMP = 1e-4


def _sorted_value(row: Tensor, j: int) -> Tensor:
    """``torch.sort(row)[0][j]`` (ascending, 0-based) without sorting: the (d − j)-th largest entry."""
    return kth_largest(row, row.numel() - j)


def pcb_clamp_(x: Tensor, low_ratio: float, high_ratio: float) -> Tensor:
    """The reference's ``clamp(x, min_ratio, max_ratio)`` in place on the rows of ``x`` ``(N, d)``: each row
    clipped to ``[s[int(d·low_ratio)], s[int(d·(1 − high_ratio) − 1)]]``, ``s`` the row sorted ascending
    (Python float arithmetic and truncation, as the reference; when the low bound is above the high one every
    entry becomes the high bound, as ``torch.clamp``)."""
    d = x.shape[1]
    lo_j = min(max(int(d * low_ratio), 0), d - 1)
    hi_j = min(max(int(d * (1 - high_ratio) - 1), 0), d - 1)
    for row in x:
        lo = _sorted_value(row, lo_j) if lo_j > 0 else row.min()
        hi = _sorted_value(row, hi_j) if hi_j < d - 1 else row.max()
        torch.clamp(row, lo, hi, out=row)
    return x


def pcb_normalize_(x: Tensor) -> Tensor:
    """The reference's ``normalize(x, dim=1)`` in place: each row min-max scaled to [0, 1]. A constant row
    (where the reference divides 0 by 0) becomes 0."""
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - lo
    x.sub_(lo).div_(torch.where(span > 0, span, torch.ones_like(span)))
    return x


def pcb_scores(task_vectors: Sequence[Tensor], ratio: float = 0.1, clamp: float = PCB_CLAMP) -> tuple[Tensor, Tensor]:
    """PCB's clamped task vectors τ̃ and their drop-and-rescale weights s, both ``(N, numel)`` float32.

    With τ the N flattened task vectors (rows) and d entries each (the reference's ``PCB_merge``):

    1. |τ| clamped per row to its ``clamp`` and ``1 − clamp`` quantiles (the reference's
       ``clamp(|τ|, 1e-4, 1e-4)``); τ̃ = sign(τ)·|τ|clamped.
    2. Intra-balancing (paper eq. 2, ``self_pcb``): ``exp(N · Norm(|τ|clamped)²)`` — the softmax over the
       task's entries with temperature N, on the min-max normalised clamped magnitudes (squared after the
       normalisation, as the code; the paper writes Norm(τ ⊙ τ)). The softmax's denominator is left out, as in
       the reference: it cancels in the min-max normalisation of step 5. We compute ``exp(N·(Norm² − 1))``,
       the same up to the factor e^N that cancels there too, so that many experts cannot overflow.
    3. Inter-balancing (paper eq. 3, ``cross_pcb``): ``tanh(τᵢ ⊙ Σⱼ τⱼ)`` on the unclamped vectors (the
       reference's ``act``; the paper writes a softmax over tasks).
    4. β = intra ⊙ inter.
    5. Drop and rescale: β clamped from below at its row's ``s[int(d·(1 − ratio))]`` (s ascending), then
       min-max normalised per row: the entries above that value get weights in (0, 1], the rest 0, i.e.
       about the top ``ratio`` of each task's entries are kept (``d − int(d·(1 − ratio)) − 1`` of them
       without ties).
    """
    ts = check_tensors(task_vectors)
    r = check_range(ratio, "ratio", 0.0, 1.0, low_open=True)
    c = check_range(clamp, "clamp", 0.0, 0.5, high_open=True)
    n = len(ts)
    x = stack_f32(ts).reshape(n, -1)
    if x.shape[1] == 0:  # an empty tensor: nothing to score (the quantiles and min-max need entries)
        return x, torch.zeros_like(x)
    mag = pcb_clamp_(x.abs(), c, c)
    clamped = torch.sign(x).mul_(mag)
    intra = pcb_normalize_(mag).square_().sub_(1.0).mul_(float(n)).exp_()  # mag is consumed
    inter = x.mul_(x.sum(dim=0)).tanh_()  # τᵢ ⊙ Σⱼτⱼ (the sum is taken first); x is consumed
    del x, mag
    balance = inter.mul_(intra)
    del intra
    scale = pcb_normalize_(pcb_clamp_(balance, 1 - r, 0.0))
    return clamped, scale


def pcb(
    task_vectors: Sequence[Tensor],
    ratio: float = 0.1,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    clamp: float = PCB_CLAMP,
) -> Tensor:
    """PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging",
    arXiv:2410.02396), as the authors' ``PCB_merge``: ``λ · Σᵢ wᵢ sᵢ τ̃ᵢ / max(Σᵢ sᵢ, 1e-12)``.

    τ̃ᵢ and sᵢ from :func:`pcb_scores` (``ratio``: the reference's ``pcb_ratio``, default 0.1 as its
    ``PCB_merge``; ``clamp``: its magnitude clamp, 1e-4). ``weights`` wᵢ are the reference's per-task λ
    (``lams``, multiplied into τ̃ᵢ before the weighting; the divisor is Σ sᵢ without them), ``scale`` a
    global λ. An entry no task keeps is 0. With fewer than about 1/ratio entries in a tensor no entry is
    kept and its merged task vector is 0 (the reference divides 0 by 0 there); an empty tensor gives an
    empty one.
    """
    lam = check_real(scale, "scale")
    clamped, s = pcb_scores(task_vectors, ratio, clamp)
    n = clamped.shape[0]
    w = weight_list(weights, n)
    shape = task_vectors[0].shape
    num = torch.zeros(clamped.shape[1], dtype=torch.float32, device=clamped.device)
    for i in range(n):
        num.add_(clamped[i].mul_(w[i]).mul_(s[i]))
    den = s.sum(dim=0).clamp_min_(1e-12)
    out = num.div_(den)
    return (out if lam == 1.0 else out.mul_(lam)).reshape(shape)


__all__ = ["PCB_CLAMP", "pcb", "pcb_clamp_", "pcb_normalize_", "pcb_scores"]
