"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023, arXiv:2306.01708).

The election and the disjoint merge are shared by every ``consensus="ties"`` variant (magnitude_prune,
DARE-TIES, breadcrumbs-TIES, DELLA, KnOTS-TIES): :func:`consensus_merge`.

Conventions (identical to PEFT ``calculate_majority_sign_mask`` / ``disjoint_merge`` and mergekit
``get_mask``): the elected sign is +1 where the election score is ``>= 0`` (a tie elects +); an entry of
model i takes part when its value is nonzero and has the elected sign (zeros never count).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ._common import PerModel, check_choice

SIGN_METHODS = ("total", "frequency")
DIVISORS = ("count", "weight_sum", None)


def elect_sign(stacked: Tensor, sign_method: str = "total") -> Tensor:
    """Elected sign γ ∈ {+1, −1} per entry of ``stacked`` ``(N, *shape)``.

    ``"total"``: γ = sign(Σᵢ xᵢ) (TIES paper, PEFT "total", mergekit "sum");
    ``"frequency"``: γ = sign(Σᵢ sign xᵢ) (PEFT "frequency", mergekit "count"). Ties elect +1.
    """
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    score = stacked.sum(dim=0) if sign_method == "total" else torch.sign(stacked).sum(dim=0)
    return torch.where(score >= 0, 1.0, -1.0).to(torch.float32)


def consensus_merge(
    stacked: Tensor,
    weights: Sequence[float],
    *,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
) -> Tensor:
    """Sign election + disjoint merge of already-sparsified vectors ``stacked`` ``(N, *shape)``.

    γ is elected over the unweighted vectors (``weighted_sign=False``, TIES paper and PEFT) or over
    ``wᵢ xᵢ`` (``weighted_sign=True``, mergekit). Model i agrees at an entry when its value (weighted when
    ``weighted_sign``) is nonzero with sign γ. Result: ``Σ_agreeing wᵢ xᵢ / D`` with D = number of agreeing
    models (``"count"``, paper/PEFT), Σ of agreeing wᵢ (``"weight_sum"``, mergekit ``normalize=True``) or 1
    (``None``, mergekit ``normalize=False``); an entry with no agreeing model is 0. ``stacked`` is consumed
    (may be overwritten).
    """
    check_choice(divisor, "divisor", DIVISORS)
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    w = [float(x) for x in weights]
    if weighted_sign:
        for i, wi in enumerate(w):
            stacked[i].mul_(wi)
    # One model at a time: O(one tensor) of temporaries beyond ``stacked``. Sums start from their first
    # term (0 + x is x, up to the sign of a zero, which no comparison below sees).
    votes = [stacked[i] if sign_method == "total" else torch.sign(stacked[i]) for i in range(stacked.shape[0])]
    score = votes[0].clone()
    for v in votes[1:]:
        score.add_(v)
    del votes
    gamma = torch.where(score >= 0, 1.0, -1.0).to(torch.float32)
    del score
    num = den = None
    for i, wi in enumerate(w):
        agree = (stacked[i] * gamma) > 0  # nonzero with the elected sign
        # stacked[i] already holds wᵢxᵢ when weighted_sign
        term = torch.where(agree, stacked[i] if weighted_sign else stacked[i] * wi, 0.0)
        num = term if num is None else num.add_(term)
        if divisor == "count":
            den = agree.to(torch.float32) if den is None else den.add_(agree)
        elif divisor == "weight_sum":
            term = torch.where(agree, wi, 0.0)  # = agree·wᵢ in float32
            den = term if den is None else den.add_(term)
    if divisor == "count":
        return num / den.clamp_min(1.0)
    if divisor == "weight_sum":
        return num / torch.where(den == 0, 1.0, den)
    return num


def ties(
    task_vectors: Sequence[Tensor],
    density: PerModel = 0.2,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    keep_count: str = "round",
) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): merged task vector ``λ · disjoint_mean(trim(τᵢ))``.

    1. Trim: keep the top ``k = round(density·numel)`` entries of each τᵢ by |·| (per tensor; ties at the
       threshold go to the lower flat index, see :func:`magnitude_mask`); default density 0.2 = the
       paper's top-20%. ``keep_count="floor"``: ``k = int(density·numel)`` (mergekit, PEFT).
    2. Elect: γ = sign(Σ τ̂ᵢ) over the trimmed, unweighted vectors (``sign_method="frequency"``:
       sign(Σ sign τ̂ᵢ); ``weighted_sign=True``: over wᵢτ̂ᵢ as mergekit does).
    3. Disjoint merge: average of wᵢτ̂ᵢ over the models whose trimmed entry is nonzero with sign γ
       (``divisor``: ``"count"`` as the paper and PEFT, ``"weight_sum"`` as mergekit ``ties``
       ``normalize=True``, ``None`` for the plain sum); then times λ = ``scale``.

    With density·numel integral, equals ``scale * peft.utils.merge_utils.ties(τ, weights, density)``;
    mergekit 0.1.5 ``ties`` is ``keep_count="floor", weighted_sign=True, divisor="weight_sum"`` (its
    ``normalize: false``: ``divisor=None``).
    """
    from .sparsify import magnitude_prune  # the trim + consensus path every *_ties variant shares

    return magnitude_prune(task_vectors, density, weights, scale, consensus="ties", sign_method=sign_method,
                           weighted_sign=weighted_sign, divisor=divisor, keep_count=keep_count)
