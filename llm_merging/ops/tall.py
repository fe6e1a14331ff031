"""TALL masks and Consensus Merging (Wang et al., ICML 2024, "Localizing Task Information for Improved Model
Merging and Compression", arXiv:2405.07813): task arithmetic or TIES kept where at least k experts' TALL masks
agree (the methods ``consensus_ta`` and ``consensus_ties``).

Not to be confused with :mod:`llm_merging.ops.consensus`, TIES' sign election ("consensus" in mergekit's
sense), which ``consensus_ties`` uses through :func:`llm_merging.ops.ties.ties`.

Every function takes task vectors τᵢ = θᵢ − θ₀ of one tensor and returns the merged task vector (float32, on
the inputs' device; the caller adds θ₀). Nothing here is random. The reference code works on the whole model flattened into one vector;
here each tensor is its own vector, so TIES' top-k is per tensor.

References read (reimplemented, not copied): ``nik-dim/tall_masks`` @ 088dc81 (``src/utils/tallmask_utils.py``:
``generate_task_masks``, ``construct_consensus_mask``; ``src/eval/aggregation.py``: ``create_task_vector``;
``src/utils/ties_utils.py``), and FusionBench's ``fusion_bench/method/tall_mask``.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import PerModel, check_choice, check_real, check_tensors, f32, per_model
from llm_merging.ops.consensus import SIGN_METHODS
from llm_merging.ops.ties import ties

#: consensus_ties' disjoint merge of the TIES multi-task vector: the sum (None, the reference) or the mean
CONSENSUS_DIVISORS = (None, "count")


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


__all__ = ["CONSENSUS_DIVISORS", "consensus_mask", "consensus_ta", "consensus_ties", "tall_masks"]
