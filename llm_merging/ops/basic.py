"""Weighted averaging, task arithmetic and ExPO's extrapolation (task arithmetic of one expert)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import (
    PerModel,
    check_range,
    check_real,
    check_tensors,
    f32,
    weight_list,
    weighted_sum_f32,
)


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


def expo(task_vector: Tensor, alpha: float = 0.3) -> Tensor:
    """ExPO (Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment", arXiv:2404.16792):
    θ = θ_aligned + α(θ_aligned − θ_sft), i.e. the merged task vector ``(1 + α) · τ`` with τ = θ_aligned −
    θ_sft: task arithmetic of the one expert with λ = 1 + α. α > 0 (default 0.3, the reference README's
    "0.3 or 0.5 is usually good"). Reference read: ``chujiezheng/LLM-Extrapolation`` @ 04e04f5
    (``code/extrapolate.py``)."""
    (t,) = check_tensors([task_vector], "task_vector")
    a = check_range(alpha, "alpha", 0.0, float("inf"), low_open=True)
    return f32(t).mul(1.0 + a)


def divide_by_weight_sum(merged: Tensor, weights: Sequence[float]) -> Tensor:
    """``merged / Σ wᵢ`` (mergekit's normalize without consensus; unchanged where |Σ wᵢ| < 1e-8)."""
    total = float(sum(weights))
    return merged if abs(total) < 1e-8 else merged / total
