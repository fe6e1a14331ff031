"""Sparsify-then-merge methods: magnitude pruning, DARE, Model Breadcrumbs, DELLA.

Each sparsifies every task vector on its own (per tensor), then either sums the weighted results
(``consensus=None``: ``λ Σ wᵢ τ̃ᵢ``) or runs the TIES sign election and disjoint merge on them
(``consensus="ties"``, see :func:`llm_merging.ops.consensus.consensus_merge`).

Random methods take ``seed``; model i draws its mask with the counter-based generator of
:mod:`llm_merging.ops.masks` keyed by ``derive_seed(seed, i)`` (a SplitMix64 mix of seed and i, so streams
are distinct per model), computed on the tensor's own device: the same seed gives bit-identical masks on
CPU and GPU. The caller should pass a different seed per tensor (e.g. derived from the run seed and the
tensor name).

mergekit parity notes (its defaults differ per method): mergekit elects the sign over weighted deltas
(``weighted_sign=True`` here), divides by the sum of agreeing weights when ``normalize=True``
(``divisor="weight_sum"``) and not at all when ``normalize=False`` (``divisor=None``; the default for its
``dare_ties`` and ``breadcrumbs_ties``), and its ``rescale=True`` is an L1-norm rescale (``rescale="l1"``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.ops._common import (
    KEEP_COUNTS,
    CounterScratch,
    PerModel,
    check_choice,
    check_seed,
    check_tensors,
    derive_seed,
    f32,
    per_model,
    stack_f32,
    weight_list,
)
from llm_merging.ops.consensus import combine, common_checks
from llm_merging.ops.masks import (
    RESCALES,
    abs_sum64,
    apply_mask,
    breadcrumbs_mask,
    check_della,
    dare_drop_,
    della_mask,
    l1_rescale_,
)
from llm_merging.ops.streaming import CHUNK, magnitude_prune_chunks  # the one implementation of the trim


def magnitude_prune(
    task_vectors: Sequence[Tensor],
    density: PerModel,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    *,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    keep_count: str = "round",
) -> Tensor:
    """Magnitude pruning then merge: keep the top ``round(density·numel)`` |τᵢ| entries of each task vector
    (``keep_count="floor"``: ``int(density·numel)``, at least 1, as mergekit and PEFT).

    ``consensus=None``: ``λ Σ wᵢ τ̂ᵢ`` (= ``scale * peft.utils.merge_utils.magnitude_prune`` when
    density·numel is integral; mergekit ``sparsification_method: magnitude`` without consensus).
    ``consensus="ties"``: TIES election + disjoint merge, i.e. :func:`~llm_merging.ops.ties.ties`.
    """
    ts = check_tensors(task_vectors)
    common_checks(consensus, sign_method, divisor, scale)
    check_choice(keep_count, "keep_count", KEEP_COUNTS)
    per_model(density, len(ts), "density", 0.0, 1.0, low_open=True)
    weight_list(weights, len(ts))
    # The whole tensor as chunks of the flat entries: the same top-k set as magnitude_mask (an exact
    # radix select instead of kthvalue), elementwise merge; O(chunk) temporaries beyond the result.
    flat = [t.detach().reshape(-1) for t in ts]
    n, device = flat[0].numel(), flat[0].device
    out = torch.empty(n, dtype=torch.float32, device=device)
    chunks = magnitude_prune_chunks(
        lambda s, e: (None, [f32(x[s:e]) for x in flat]), n, density, weights, scale, consensus,
        n_models=len(ts), sign_method=sign_method, weighted_sign=weighted_sign, divisor=divisor,
        keep_count_mode=keep_count, chunk=CHUNK if device.type == "cpu" else 1 << 24)
    for start, stop, merged in chunks:
        out[start:stop] = merged
    return out.reshape(ts[0].shape)


def dare(
    task_vectors: Sequence[Tensor],
    density: PerModel,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    rescale: Optional[str] = "inverse",
    seed: int = 0,
    sign_method: str = "total",
    *,
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
) -> Tensor:
    """DARE, Drop And REscale (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099).

    Each entry of τᵢ is kept with probability ``density`` (p) and kept entries are rescaled by 1/p
    (``rescale="inverse"``, paper and PEFT); ``rescale="l1"`` rescales each pruned vector to the L1 norm
    of the original (mergekit ``rescale: true``); ``None`` no rescale. Then
    ``consensus=None`` → DARE-linear ``λ Σ wᵢ τ̃ᵢ`` (PEFT ``dare_linear``);
    ``consensus="ties"`` → DARE-TIES: sign election + disjoint merge over the dropped-and-rescaled vectors
    (PEFT ``dare_ties``). Masks: see the module docstring (``seed``, counter-based generator, per-model streams).
    """
    ts = check_tensors(task_vectors)
    lam = common_checks(consensus, sign_method, divisor, scale)
    check_choice(rescale, "rescale", RESCALES)
    s = check_seed(seed)
    dens = per_model(density, len(ts), "density", 0.0, 1.0, low_open=True)
    w = weight_list(weights, len(ts))
    stacked = stack_f32(ts)
    scratch = CounterScratch(stacked.device)
    for i, d in enumerate(dens):
        if d < 1.0:
            x = stacked[i]
            before = math.fsum(abs_sum64(x)) if rescale == "l1" else None
            dare_drop_(x, d, derive_seed(s, i), inverse=rescale == "inverse", scratch=scratch)
            if before is not None:
                l1_rescale_(x, before, math.fsum(abs_sum64(x)))
    return combine(stacked, w, lam, consensus, sign_method, weighted_sign, divisor)


def breadcrumbs(
    task_vectors: Sequence[Tensor],
    density: PerModel = 0.9,
    gamma: PerModel = 0.01,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = None,
    *,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    keep_count: str = "round",
) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795), mergekit ``breadcrumbs`` /
    ``breadcrumbs_ties`` masks.

    Per tensor and model, drop the ``gamma`` fraction of largest-magnitude entries (outliers) and the
    smallest ``1 − density − gamma`` fraction, keeping ``density`` of the entries (see
    :func:`~llm_merging.ops.masks.breadcrumbs_mask`); no rescaling. ``consensus=None``: ``λ Σ wᵢ τ̃ᵢ``
    (mergekit ``breadcrumbs``); ``"ties"``: sign election + disjoint merge (mergekit ``breadcrumbs_ties``
    uses ``weighted_sign=True, divisor=None``). ``keep_count="floor"``: mergekit 0.1.5's truncated counts.
    """
    ts = check_tensors(task_vectors)
    lam = common_checks(consensus, sign_method, divisor, scale)
    n = len(ts)
    dens = per_model(density, n, "density", 0.0, 1.0, low_open=True)
    gams = per_model(gamma, n, "gamma", 0.0, 1.0, high_open=True)
    check_choice(keep_count, "keep_count", KEEP_COUNTS)
    w = weight_list(weights, n)
    stacked = stack_f32(ts)
    for i, (d, g) in enumerate(zip(dens, gams)):
        if d < 1.0:
            stacked[i].masked_fill_(~breadcrumbs_mask(stacked[i], d, g, keep_count), 0.0)
    return combine(stacked, w, lam, consensus, sign_method, weighted_sign, divisor)


def della(
    task_vectors: Sequence[Tensor],
    density: PerModel = 0.7,
    epsilon: PerModel = 0.1,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    consensus: Optional[str] = "ties",
    seed: int = 0,
    *,
    rescale: Optional[str] = "inverse",
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
) -> Tensor:
    """DELLA-Merging with MagPrune (Deep et al. 2024, arXiv:2406.11617), mergekit ``della`` semantics.

    Per tensor and model, entries are ranked by magnitude within each row and kept with probability rising
    linearly from ``density − ε`` (smallest) to ``density + ε`` (largest) — drop probabilities pᵢ in
    [p − ε, p + ε] around p = 1 − density (see :func:`~llm_merging.ops.masks.della_keep_probabilities`);
    kept entries are rescaled by 1/(1 − pᵢ) (``rescale="inverse"``, paper; mergekit rescales by the L1
    norm instead: ``rescale="l1"``). Then ``consensus="ties"`` → sign election + disjoint mean (``della``),
    ``None`` → ``λ Σ wᵢ τ̃ᵢ`` (``della_linear``). An ε that puts a probability outside [0, 1] is a
    :class:`ConfigError`; density 1 means no pruning.
    """
    ts = check_tensors(task_vectors)
    lam = common_checks(consensus, sign_method, divisor, scale)
    check_choice(rescale, "rescale", RESCALES)
    s = check_seed(seed)
    n = len(ts)
    dens = per_model(density, n, "density", 0.0, 1.0, low_open=True)
    eps = per_model(epsilon, n, "epsilon", 0.0, 1.0)
    for d, e in zip(dens, eps):
        check_della(d, e)
    w = weight_list(weights, n)
    stacked = stack_f32(ts)
    for i, (d, e) in enumerate(zip(dens, eps)):
        if d < 1.0:
            mask, keep = della_mask(stacked[i], d, e, derive_seed(s, i))
            stacked[i] = apply_mask(stacked[i], mask, rescale, keep)
    return combine(stacked, w, lam, consensus, sign_method, weighted_sign, divisor)
