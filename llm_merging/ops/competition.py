"""Merges that decide, entry by entry, which experts' changes compete and which survive: PCB-Merging, MagMax,
TALL-mask consensus (on task arithmetic and on TIES) and ExPO's extrapolation.

Every function takes task vectors τᵢ = θᵢ − θ₀ of one tensor and returns the merged task vector (float32, on
the inputs' device; the caller adds θ₀). Nothing here is random. The authors' reference code works on the
whole model flattened into one vector; here each tensor is its own vector (as every method of
:mod:`llm_merging.ops`), so PCB's quantiles and min-max normalisations and TIES' top-k are per tensor.

References read (reimplemented, not copied):

* PCB-Merging: ``duguodong7/pcb-merging`` @ 31fa2dc (``pcb-merging.py``: ``PCB_merge``, ``clamp``,
  ``normalize``; ``nlp_source_code/merging.py``: ``get_score`` for the per-task λ).
* MagMax: ``danielm1405/magmax`` @ 4f49f18 (``src/merging/task_vectors.py``: ``merge_max_abs``;
  ``merge_splitted.py`` / ``merge_8datasets.py``: scaling 0.5).
* TALL masks / Consensus Merging: ``nik-dim/tall_masks`` @ 088dc81 (``src/utils/tallmask_utils.py``:
  ``generate_task_masks``, ``construct_consensus_mask``; ``src/eval/aggregation.py``: ``create_task_vector``;
  ``src/utils/ties_utils.py``), and FusionBench's ``fusion_bench/method/tall_mask``.
* ExPO: ``chujiezheng/LLM-Extrapolation`` @ 04e04f5 (``code/extrapolate.py``; README: α 0.3 or 0.5).
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import (
    PerModel,
    check_choice,
    check_range,
    check_real,
    check_tensors,
    f32,
    per_model,
    stack_f32,
    weight_list,
)
from llm_merging.ops.consensus import SIGN_METHODS
from llm_merging.ops.masks import kth_largest
from llm_merging.ops.ties import ties

TIE_BREAKS = ("first", "last")
#: consensus_ties' disjoint merge of the TIES multi-task vector: the sum (None, the reference) or the mean
CONSENSUS_DIVISORS = (None, "count")
#: PCB's default clamp of |τ| (fraction clipped at each end, per task): ``pcb-merging.py``'s ``PCB_merge``
PCB_CLAMP = 1e-4


# ----------------------------------------------------------------------------------------------- PCB
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
    kept and its merged task vector is 0 (the reference divides 0 by 0 there).
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


# ------------------------------------------------------------------------------------------ MagMax
def magmax(task_vectors: Sequence[Tensor], scale: float = 0.5, tie_break: str = "first") -> Tensor:
    """MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
    Learning", arXiv:2407.06322): ``λ · τ_{i*}`` per entry, i* = argmaxᵢ |τᵢ| (paper eq. 2).

    Ties in |τᵢ| (e.g. x and −x) go to the lowest expert index (``tie_break="first"``, as ``torch.argmax``);
    the authors' ``merge_max_abs`` folds the experts with ``|τ_new| >= |τ_best|``, so its ties go to the
    highest index: ``tie_break="last"``. Default λ 0.5: the reference's scripts' ``scaling_coef``.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    check_choice(tie_break, "tie_break", TIE_BREAKS)
    out = f32(ts[0]).detach().clone()
    best = out.abs()
    for t in ts[1:]:
        t = f32(t)
        a = t.abs()
        take = a > best if tie_break == "first" else a >= best
        out = torch.where(take, t, out)
        best = torch.where(take, a, best)
    return out if lam == 1.0 else out.mul_(lam)


# -------------------------------------------------------------------------------- TALL / consensus
def tall_masks(task_vectors: Sequence[Tensor], multi_task: Tensor, tall_lambda: PerModel = 0.6) -> Tensor:
    """TALL masks (Wang et al., ICML 2024, "Localizing Task Information for Improved Model Merging and
    Compression", arXiv:2405.07813, eq. 4): ``mᵢ = |τᵢ| > λᵢ · |τ_MTL − τᵢ|``, a bool tensor ``(N, *shape)``.

    The reference's ``generate_task_masks`` compares ``|θ₀ − θᵢ| > |θ_MTL − θᵢ| · λ`` on the checkpoints
    (θ_MTL = θ₀ + τ_MTL); here the same sides are formed from the exact task vectors. The comparison is
    strict, as the code (the paper writes ≥): an expert with τᵢ = 0 at an entry never marks it.
    """
    ts = check_tensors(task_vectors)
    check_tensors([ts[0], multi_task], "multi_task")
    lams = per_model(tall_lambda, len(ts), "tall_lambda", 0.0)
    mtl = f32(multi_task)
    out = torch.empty((len(ts), *ts[0].shape), dtype=torch.bool, device=ts[0].device)
    for i, (t, lam) in enumerate(zip(ts, lams)):
        t = f32(t)
        torch.gt(t.abs(), (mtl - t).abs_().mul_(lam), out=out[i])
    return out


def consensus_mask(task_vectors: Sequence[Tensor], multi_task: Tensor, k: int = 2,
                   tall_lambda: PerModel = 0.6) -> Tensor:
    """The consensus mask: entries that at least ``k`` of the experts' TALL masks mark (the reference's
    ``construct_consensus_mask``, ``prun_thre_k``). k = 0 keeps every entry (task arithmetic or TIES
    unchanged), k = 1 drops the "catastrophic" entries no task needs, k = 2 (default) also the "selfish"
    ones only one task needs; k above the number of experts drops everything."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ConfigError(f"k: expected an integer >= 0, got {k!r}")
    masks = tall_masks(task_vectors, multi_task, tall_lambda)
    return masks.sum(dim=0, dtype=torch.int32) >= int(k)


def consensus_ta(task_vectors: Sequence[Tensor], k: int = 2, tall_lambda: PerModel = 0.6,
                 scale: float = 1.0) -> Tensor:
    """Consensus task arithmetic (Wang et al. 2024, Algorithm 1 with task arithmetic): τ_MTL = Σᵢ τᵢ (the
    reference's ``method.k=100``: no top-k before the sum), TALL masks against it, and
    ``λ · τ_MTL ⊙ m_consensus``. Elementwise."""
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    mtl = f32(ts[0]).detach().clone()
    for t in ts[1:]:
        mtl.add_(f32(t))
    keep = consensus_mask(ts, mtl, k, tall_lambda)
    out = mtl.masked_fill_(~keep, 0.0)
    return out if lam == 1.0 else out.mul_(lam)


def consensus_ties(
    task_vectors: Sequence[Tensor],
    k: int = 2,
    tall_lambda: PerModel = 0.6,
    density: PerModel = 0.2,
    scale: float = 1.0,
    *,
    sign_method: str = "total",
    divisor: Optional[str] = None,
    keep_count: str = "round",
) -> Tensor:
    """Consensus TIES (Wang et al. 2024 with TIES-Merging): τ_MTL = TIES of the task vectors (top
    ``density`` per tensor, sign election, disjoint merge), TALL masks against it, ``λ · τ_MTL ⊙ m_consensus``.

    Reference conventions (``create_task_vector`` with ``use_ties``): top-20% (``density`` 0.2) and the
    disjoint *sum* (``ties_merging(..., merge_func="dis-sum")``, ``divisor=None``; ``"count"`` gives the
    paper's TIES mean). Ours keeps ``round(density·n)`` entries per tensor where the reference's inclusive
    ``kthvalue`` threshold keeps ``int(density·n) + 1``, and a zero election score elects + where the
    reference takes the sign of the whole vector's majority (at such entries no trimmed value survives
    unless the values cancel exactly).
    """
    check_choice(divisor, "divisor", CONSENSUS_DIVISORS)
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    lam = check_real(scale, "scale")
    mtl = ties(task_vectors, density=density, sign_method=sign_method, divisor=divisor, keep_count=keep_count)
    keep = consensus_mask(task_vectors, mtl, k, tall_lambda)
    out = mtl.masked_fill_(~keep, 0.0)
    return out if lam == 1.0 else out.mul_(lam)


# -------------------------------------------------------------------------------------------- ExPO
def expo(task_vector: Tensor, alpha: float = 0.3) -> Tensor:
    """ExPO (Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment", arXiv:2404.16792):
    θ = θ_aligned + α(θ_aligned − θ_sft), i.e. the merged task vector ``(1 + α) · τ`` with τ = θ_aligned −
    θ_sft: task arithmetic of the one expert with λ = 1 + α. α > 0 (default 0.3, the reference README's
    "0.3 or 0.5 is usually good")."""
    (t,) = check_tensors([task_vector], "task_vector")
    a = check_range(alpha, "alpha", 0.0, float("inf"), low_open=True)
    return f32(t).mul(1.0 + a)


__all__ = [
    "consensus_mask",
    "consensus_ta",
    "consensus_ties",
    "expo",
    "magmax",
    "pcb",
    "pcb_scores",
    "tall_masks",
]
