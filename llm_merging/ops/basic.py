"""Weighted averaging and task arithmetic."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from llm_merging.core.errors import ConfigError

from llm_merging.ops._common import PerModel, check_real, check_tensors, weight_list, weighted_sum_f32


def linear(tensors: Sequence[Tensor], weights: Optional[PerModel] = None, normalize: bool = True) -> Tensor:
    """Weighted average ("model soup", Wortsman et al. 2022): ``Σ wᵢ xᵢ / Σ wᵢ``.

    With ``normalize=False`` the weighted sum ``Σ wᵢ xᵢ`` is returned. ``weights`` default to 1 (plain mean);
    a zero weight sum with ``normalize=True`` is a :class:`ConfigError`. Works on full weights or on task
    vectors alike.
    """
    ts = check_tensors(tensors, "tensors")
    w = weight_list(weights, len(ts))
    total = sum(w)
    if normalize and abs(total) < 1e-12:
        raise ConfigError(f"weights: sum is {total!r}; cannot normalise (use normalize=False)")
    out = weighted_sum_f32(ts, w)
    if normalize:
        out.div_(total)
    return out


def task_arithmetic(
    task_vectors: Sequence[Tensor], weights: Optional[PerModel] = None, scale: float = 1.0
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): ``λ Σ wᵢ τᵢ``.

    Returns the merged task vector (the caller adds θ₀). Equals ``peft.utils.merge_utils.task_arithmetic``
    times ``scale``.
    """
    ts = check_tensors(task_vectors)
    w = weight_list(weights, len(ts))
    lam = check_real(scale, "scale")
    return weighted_sum_f32(ts, w).mul_(lam)
