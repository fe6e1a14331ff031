"""CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging", arXiv:2412.12153; reference code
``JH-GEECS/CART``, ``src/merging.py`` ``StaticMergeModule._merge_weights("CART")`` and
``_get_truncated_task_vectors``): centred task vectors, each truncated to low rank, added to the average.

With θ_avg = θ₀ + mean(τ) and the centred vectors τ̄ᵢ = θᵢ − θ_avg = τᵢ − mean(τ), the reference merges

    θ = θ_avg + λ · Σᵢ SVD_k(τ̄ᵢ)

(``prior`` λ, the sum over tasks, not the mean), where SVD_k keeps the top ``k = max(1, int(rank_ratio ·
min(m, n)))`` singular triplets of each matrix (``rank_ratio`` 0: nothing, 1: the whole matrix). Only the
attention/MLP matrices are truncated; every other tensor keeps its centred vectors whole, whose sum is 0, so
it gets the plain average. Optional ``rank_by="energy"`` (the reference's ``energy_threshold``): the
smallest k whose Σ σ² reaches ``rank_ratio`` of the total.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from llm_merging.ops._common import check_choice, check_range, check_real, check_tensors, per_matrix, stack_f32

RANK_BY = ("count", "energy")


def cart_rank(singular_values: Tensor, rank_ratio: float, rank_by: str = "count") -> int:
    """The number of singular triplets CART keeps of a matrix with these singular values (descending):
    ``max(1, int(rank_ratio · len))`` (``"count"``) or the smallest k with Σ_{j<k} σⱼ² ≥ ``rank_ratio`` · Σ σ²
    (``"energy"``); 0 when ``rank_ratio`` is 0, all of them when it is 1."""
    check_choice(rank_by, "rank_by", RANK_BY)
    ratio = check_range(rank_ratio, "rank_ratio", 0.0, 1.0)
    dim = int(singular_values.numel())
    if ratio == 0.0 or dim == 0:
        return 0
    if ratio == 1.0:
        return dim
    if rank_by == "energy":
        energy = singular_values.to(torch.float32) ** 2
        total = energy.sum()
        if float(total) == 0.0:
            return 0
        reached = (torch.cumsum(energy, dim=0) / total >= ratio).nonzero()
        return int(reached[0, 0]) + 1 if reached.numel() else dim
    return max(1, int(ratio * dim))


def cart(task_vectors: Sequence[Tensor], rank_ratio: float = 0.12, scale: float = 2.0, *,
         low_rank: bool = True, rank_by: str = "count") -> Tensor:
    """CART's merged task vector ``mean(τ) + λ · Σᵢ SVD_k(τᵢ − mean(τ))`` (see the module docstring).

    ``low_rank=False`` or a tensor that is not 2-D: ``mean(τ)`` (the reference's untruncated tensors); a 3-D
    tensor is a stack of matrices (fused MoE experts), merged matrix by matrix. One
    expert gives τ back; two experts give their mean for any rank (τ̄₂ = −τ̄₁, so the truncations cancel).
    SVDs in float32 on the inputs' device.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    check_range(rank_ratio, "rank_ratio", 0.0, 1.0)
    check_choice(rank_by, "rank_by", RANK_BY)
    if low_rank and ts[0].dim() == 3:  # a stack of matrices (fused MoE experts): each on its own
        return per_matrix(cart, ts, rank_ratio, scale, low_rank=True, rank_by=rank_by)
    stacked = stack_f32(ts)
    mean = stacked.mean(dim=0)
    if not low_rank or mean.dim() != 2 or rank_ratio in (0.0, 1.0):
        return mean  # nothing kept, or whole centred vectors, whose sum is 0
    acc = torch.zeros_like(mean)
    for row in stacked:
        centred = row.sub_(mean)
        if not bool(centred.any()):
            continue
        u, s, vh = torch.linalg.svd(centred, full_matrices=False)
        k = cart_rank(s, rank_ratio, rank_by)
        if k:
            acc.add_((u[:, :k] * s[:k]) @ vh[:k])
        del u, s, vh
    return acc.mul_(lam).add_(mean)
