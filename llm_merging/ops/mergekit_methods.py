"""Elementwise-selection merges of mergekit 0.1.5: SCE, RAM, RAM+ (tensor-local), NearSwap, Arcee Fusion.

Each function follows the corresponding mergekit method (``mergekit/merge_methods/sce.py``, ``ram.py``,
``nearswap.py``, ``arcee_fusion.py``) step by step, with the same constants, branches and defaults, so a
mergekit recipe gives the same tensors up to float32 rounding (mergekit computes in the inputs' dtype;
here always float32). ``sce``, ``ram`` and ``ramplus_tl`` use the base model only through the task
vectors τᵢ = θᵢ − θ₀: they take task vectors and return the merged task vector (the caller adds θ₀).
``nearswap`` and ``arcee_fusion`` compare a model with the base elementwise: they take ``base`` and
``model`` and return weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llm_merging.ops._common import check_pair, check_range, check_tensors, dot64, f32, stack_f32
from llm_merging.ops.consensus import elect_sign
from llm_merging.ops.masks import kth_largest, topk_flat

# --------------------------------------------------------------------------------------------------
# SCE
# --------------------------------------------------------------------------------------------------


def sce_mask(task_vectors: Sequence[Tensor], select_topk: float, *, stable_ties: bool = False) -> Tensor:
    """SCE "select" mask (mergekit ``sce_mask``): the entries with the largest variance across models.

    var = population variance over the models per entry; ``k = int(float32(count_nonzero(var)) ·
    select_topk)`` as mergekit computes it (a floor, counted over the entries that vary at all); the k
    entries with the largest variance are kept. ``select_topk ≥ 1`` keeps all, ``≤ 0`` or k = 0 none.
    Ties at the threshold (frequent: task vectors of bf16/fp16 checkpoints take few distinct values) are
    left to ``torch.topk`` exactly as mergekit does, so the mask equals mergekit's on the same device and
    PyTorch build; ``stable_ties=True`` gives them to the lower flat index instead (the same on every
    device, see :mod:`llm_merging.ops.masks`). Returns a boolean tensor shaped like one task vector.
    """
    ts = check_tensors(task_vectors)
    frac = check_range(select_topk, "select_topk", 0.0, 1.0)
    return _sce_mask(stack_f32(ts), frac, stable_ties)


def _sce_mask(stacked: Tensor, frac: float, stable_ties: bool) -> Tensor:
    shape, device = stacked.shape[1:], stacked.device
    if frac >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if frac <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    var = torch.var(stacked, dim=0, unbiased=False).reshape(-1)
    nonzero = torch.count_nonzero(var).cpu()
    k = int(nonzero * frac)  # float32 product, as mergekit's ``int(nonzero * density)``
    if stable_ties or k == 0:
        return topk_flat(var, k).reshape(shape)
    mask = torch.zeros(var.shape, dtype=torch.bool, device=device)
    mask[torch.topk(var, k=k, largest=True).indices] = True
    return mask.reshape(shape)


def sce(task_vectors: Sequence[Tensor], select_topk: float = 1.0, *, stable_ties: bool = False) -> Tensor:
    """SCE: Select, Calculate, Erase (Wan et al. 2024, FuseChat, arXiv:2408.07990; mergekit ``sce``).

    1. Select (``select_topk`` < 1, mergekit default 1.0 = keep all): zero every entry outside
       :func:`sce_mask` (``stable_ties`` as there), in all task vectors.
    2. Calculate: per-model weights ``ηᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²)`` of the selected vectors; when
       ``Σⱼ mean(τⱼ²) < 1e-6`` mergekit uses equal weights 1/N instead (an absolute threshold: LLM
       fine-tuning deltas of rms below 1e-3/√N, which are typical, get equal weights).
    3. Erase: γ = sign(Σᵢ τᵢ) per entry (+1 on ties); model i takes part where τᵢ is nonzero with sign γ.

    Result: ``Σ_agreeing ηᵢτᵢ / max(Σ_agreeing ηᵢ, 1e-6)`` (0 where no model agrees). Takes task vectors
    and returns the merged task vector.
    """
    ts = check_tensors(task_vectors)
    frac = check_range(select_topk, "select_topk", 0.0, 1.0)
    stacked = stack_f32(ts)
    n, numel = stacked.shape[0], stacked[0].numel()
    if numel == 0:
        return torch.zeros(stacked.shape[1:], dtype=torch.float32, device=stacked.device)
    if frac < 1.0:
        stacked.masked_fill_(~_sce_mask(stacked, frac, stable_ties), 0.0)
    sq = [dot64(stacked[i], stacked[i]) / numel for i in range(n)]
    total = sum(sq)
    eta = [1.0 / n] * n if abs(total) < 1e-6 else [s / total for s in sq]
    gamma = elect_sign(stacked, "total")
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma)
    for i in range(n):
        agree = (stacked[i] * gamma) > 0
        num.add_(torch.where(agree, stacked[i], 0.0), alpha=eta[i])
        den.add_(agree.to(torch.float32), alpha=eta[i])
    return num.div_(den.clamp_min_(1e-6))


# --------------------------------------------------------------------------------------------------
# RAM / RAM+
# --------------------------------------------------------------------------------------------------


def _ram_parts(task_vectors: Sequence[Tensor], epsilon: float) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """(float32 task vectors, active masks |τᵢ| > ε, number of active models per entry)."""
    ts = [f32(t) for t in check_tensors(task_vectors)]
    eps = check_range(epsilon, "epsilon", 0.0, math.inf)
    active = [t.abs() > eps for t in ts]
    counts = torch.zeros(ts[0].shape, dtype=torch.int32, device=ts[0].device)
    for a in active:
        counts.add_(a.to(torch.int32))
    return ts, active, counts


def ram(task_vectors: Sequence[Tensor], epsilon: float = 1e-5) -> Tensor:
    """RAM, Reinforced Agent Merging (arXiv:2601.13572; mergekit ``ram``).

    Entry τᵢ[j] is active when ``|τᵢ[j]| > epsilon`` (mergekit default 1e-5). Per entry: the value of the
    only active model when there is one, the mean of the active models' values when there are several
    (overlap), 0 when none (so entries with |τ| ≤ ε are dropped, not averaged in). Takes task vectors and
    returns the merged task vector.
    """
    ts, active, counts = _ram_parts(task_vectors, epsilon)
    divisor = counts.clamp_min(1).to(torch.float32)
    out = torch.zeros(ts[0].shape, dtype=torch.float32, device=ts[0].device)
    for t, a in zip(ts, active):
        out.add_(torch.where(a, t / divisor, 0.0))
    return out


def ramplus_tl(
    task_vectors: Sequence[Tensor], r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> Tensor:
    """RAM+ tensor-local (arXiv:2601.13572; mergekit ``ramplus_tl``): RAM with each model's unique
    entries amplified.

    As :func:`ram`, but model i's unique entries (active in i only) are multiplied by
    ``λᵢ = 1 + r · clamp(ρᵢ, 0, alpha)``, ``ρᵢ = sᵢ / max(uᵢ, epsilon)`` with sᵢ (uᵢ) the number of model
    i's active entries that are shared with another model (unique to it), counted in this tensor only.
    mergekit defaults: ``r`` 0.1, ``alpha`` 0.2, ``epsilon`` 1e-5 (both the activity threshold and the
    guard of ρ's denominator), so λ ∈ [1, 1.02]. Takes task vectors and returns the merged task vector.
    """
    rr = check_range(r, "r", 0.0, math.inf)
    cap = check_range(alpha, "alpha", 0.0, math.inf)
    ts, active, counts = _ram_parts(task_vectors, epsilon)
    eps = float(epsilon)
    unique = counts == 1
    shared = counts > 1
    divisor = counts.clamp_min(1).to(torch.float32)
    out = torch.zeros(ts[0].shape, dtype=torch.float32, device=ts[0].device)
    for t, a in zip(ts, active):
        a_unique = a & unique
        n_unique = int(a_unique.sum())
        n_shared = int((a & shared).sum())
        den = max(float(n_unique), eps)
        # With no unique entry λ is never used (mergekit: ρ = s/ε, or 0/0 when ε = 0).
        rho = n_shared / den if den > 0 else 0.0
        lam = 1.0 + rr * min(max(rho, 0.0), cap)
        out.add_(torch.where(a_unique, t * lam, 0.0))
        out.add_(torch.where(a & shared, t / divisor, 0.0))
    return out


# --------------------------------------------------------------------------------------------------
# NearSwap
# --------------------------------------------------------------------------------------------------


def nearswap(base: Tensor, model: Tensor, t: float) -> Tensor:
    """NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit
    ``nearswap``): take the model's value where it is near the base, interpolate towards the base where
    it is far.

    ``w = clamp(t / max(|base − model|, 1e-6), 0, 1)``, result ``w·model + (1 − w)·base``: entries within
    ``t`` of the base take the model's value, the others move ``t`` towards it. ``t`` (mergekit ``t``,
    required, no default) must be ≥ 0 (mergekit accepts a negative t, which returns the base like t = 0).
    Takes whole weights, returns weights.
    """
    check_pair(base, model, ("base", "model"))
    tt = check_range(t, "t", 0.0, math.inf)
    a, b = f32(base), f32(model)
    w = (tt / (a - b).abs().clamp_min_(1e-6)).clamp_(0.0, 1.0)
    return w * b + (1.0 - w) * a


# --------------------------------------------------------------------------------------------------
# Arcee Fusion
# --------------------------------------------------------------------------------------------------


def arcee_fusion_importance(base: Tensor, model: Tensor) -> Tensor:
    """Arcee Fusion importance ``|model − base| · KL(softmax(model) ‖ softmax(base))``, the KL divergence
    taken along the last dimension (per row of a matrix; a 1-D tensor is one row) with 1e-8 added to both
    softmax outputs (mergekit ``_compute_importance``). Same shape as the inputs."""
    check_pair(base, model, ("base", "model"))
    a, b = f32(base), f32(model)
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return (b - a).abs() * kl


def arcee_fusion(base: Tensor, model: Tensor) -> Tensor:
    """Arcee Fusion (Arcee AI, https://arcee.ai; mergekit ``arcee_fusion``, no parameters): take the
    model's value where its :func:`arcee_fusion_importance` is an upper outlier, keep the base elsewhere.

    Threshold ``median + 1.5·(Q3 − Q1)`` of the importance scores, quantile q being the sorted score at
    flat position ``floor(q·(numel − 1))``; entries with importance ≥ threshold take the model's value:
    ``base + (model − base)·mask``. mergekit estimates the quartiles from 10⁶ entries drawn at random
    (unseeded, with replacement) when a tensor has more than 10⁶ entries; here they are always exact, so
    results agree exactly up to 10⁶ entries and differ near the threshold above. Takes whole weights,
    returns weights.
    """
    importance = arcee_fusion_importance(base, model)
    a, b = f32(base), f32(model)
    flat = importance.reshape(-1)
    n = flat.numel()
    if n == 0:
        return a.clone()
    q1, med, q3 = (kth_largest(flat, n - (i * (n - 1)) // 4) for i in (1, 2, 3))
    threshold = med + 1.5 * (q3 - q1)
    mask = importance >= threshold
    return a + (b - a) * mask
