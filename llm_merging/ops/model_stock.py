"""Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
arXiv:2403.19522)."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from llm_merging.ops._common import check_tensors, dot64, stack_f32

_MK_NORM_EPS = 1e-6  # mergekit's clamp of the pairwise norm product
_MK_SINGULAR = 1e-6  # mergekit: |1 + (N-1)c| below this keeps the base (t = 0)


def _t_from_cos(cos: Union[float, Tensor], n: int) -> Union[float, Tensor]:
    return (n * cos) / (1.0 + (n - 1) * cos)


def _t_extrapolated(cos: Union[float, Tensor], n: int) -> Union[float, Tensor]:
    """mergekit 0.1.5's t for an unclamped mean cosine: 0 at the singularity 1 + (N−1)c ≈ 0."""
    den = 1.0 + (n - 1) * cos
    if isinstance(den, Tensor):
        singular = den.abs() < _MK_SINGULAR
        return torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, den))
    return 0.0 if abs(den) < _MK_SINGULAR else (n * cos) / den


def model_stock_ratio(task_vectors: Sequence[Tensor], *, extrapolate: bool = False) -> float:
    """The interpolation ratio t = N·c / (1 + (N−1)·c) of :func:`model_stock` (whole-tensor variant).

    c = mean pairwise cosine similarity of the flattened task vectors (a pair with a zero vector counts
    as c = 0), clamped to [0, 1]. ``extrapolate=True``: mergekit 0.1.5's convention (see
    :func:`model_stock`).
    """
    ts = check_tensors(task_vectors, min_count=2)
    n = len(ts)
    norms = [math.sqrt(max(dot64(t, t), 0.0)) for t in ts]
    total, pairs = 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            den = norms[i] * norms[j]
            if extrapolate:
                c = dot64(ts[i], ts[j]) / max(den, _MK_NORM_EPS)
            else:
                c = dot64(ts[i], ts[j]) / den if den > 0.0 else 0.0
            total += max(-1.0, min(1.0, c))
            pairs += 1
    if extrapolate:
        return float(_t_extrapolated(total / pairs, n))
    cos = min(1.0, max(0.0, total / pairs))
    return float(_t_from_cos(cos, n))


def model_stock(task_vectors: Sequence[Tensor], *, filter_wise: bool = False, extrapolate: bool = False) -> Tensor:
    """Model Stock merged task vector ``t · mean(τᵢ)``, so θ = t·θ_avg + (1 − t)·θ₀.

    t = N·cos θ / (1 + (N − 1)·cos θ) with cos θ the mean pairwise cosine similarity of the task vectors
    (flattened; ``filter_wise=True``: per row of a ≥2-D tensor, as mergekit's ``filter_wise``). Needs
    N ≥ 2 (:class:`ConfigError` otherwise). Pairs involving a zero vector count as cos = 0, so zero task
    vectors give zeros, never NaN.

    Clamp: the mean cosine is clamped to [0, 1], so t ∈ [0, 1] (negative agreement → t = 0 → θ₀).
    mergekit only clamps each pairwise cosine to [−1, 1]; for a mean cosine in (−1/(N−1), 0) it
    extrapolates (t < 0). For cos ≥ 0 both agree.

    ``extrapolate=True`` follows mergekit 0.1.5 exactly: no clamp of the mean cosine (t < 0 moves away
    from the average; t → ±∞ near c = −1/(N−1)), each pairwise cosine is ⟨a, b⟩ / max(‖a‖‖b‖, 1e-6)
    clamped to [−1, 1], and t = 0 where |1 + (N−1)·c| < 1e-6.
    """
    ts = check_tensors(task_vectors, min_count=2)
    n = len(ts)
    if not filter_wise:
        return stack_f32(ts).mean(dim=0) * model_stock_ratio(ts, extrapolate=extrapolate)
    stacked = stack_f32(ts)
    shape = stacked.shape[1:]
    rows = stacked.reshape(n, shape[0], -1) if len(shape) >= 2 else stacked.reshape(n, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)  # (N, R)
    cos_sum = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            den = norms[i] * norms[j]
            dot = (rows[i] * rows[j]).sum(dim=-1)
            if extrapolate:
                c = (dot / den.clamp_min(_MK_NORM_EPS)).clamp(-1.0, 1.0)
            else:
                c = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0).clamp(-1.0, 1.0)
            cos_sum += c
            pairs += 1
    if extrapolate:
        t = _t_extrapolated(cos_sum / pairs, n)
    else:
        t = _t_from_cos((cos_sum / pairs).clamp(0.0, 1.0), n)  # (R,)
    mean = rows.mean(dim=0)  # (R, C)
    return (mean * t.unsqueeze(-1)).reshape(shape)
