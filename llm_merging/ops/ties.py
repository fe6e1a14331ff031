"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al. 2023, arXiv:2306.01708).

The election and the disjoint merge are shared by every ``consensus="ties"`` variant (magnitude_prune,
DARE-TIES, breadcrumbs-TIES, DELLA, KnOTS-TIES): :func:`~llm_merging.ops.consensus.consensus_merge`, in
:mod:`llm_merging.ops.consensus` (re-exported here with :func:`~llm_merging.ops.consensus.elect_sign`).

Conventions (identical to PEFT ``calculate_majority_sign_mask`` / ``disjoint_merge`` and mergekit
``get_mask``): the elected sign is +1 where the election score is ``>= 0`` (a tie elects +); an entry of
model i takes part when its value is nonzero and has the elected sign (zeros never count).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from llm_merging.ops._common import PerModel
from llm_merging.ops.consensus import DIVISORS, SIGN_METHODS, consensus_merge, elect_sign
from llm_merging.ops.sparsify import magnitude_prune

__all__ = ["DIVISORS", "SIGN_METHODS", "consensus_merge", "elect_sign", "ties"]


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
    # the trim + consensus path every *_ties variant shares
    return magnitude_prune(task_vectors, density, weights, scale, consensus="ties", sign_method=sign_method,
                           weighted_sign=weighted_sign, divisor=divisor, keep_count=keep_count)
