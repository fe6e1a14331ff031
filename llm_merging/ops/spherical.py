"""Spherical merges of mergekit 0.1.5: NuSLERP, Multi-SLERP and the Karcher mean.

Each function follows the corresponding mergekit method (``mergekit/merge_methods/nuslerp.py``,
``multislerp.py``, ``karcher.py``) step by step, with the same constants, branches and defaults, so a
mergekit recipe gives the same tensors up to float32 rounding. Elementwise math is float32; norms and dot
products are accumulated in float64 (mergekit uses the inputs' dtype throughout). Results are new float32
tensors; where a function takes ``base`` it returns whole weights (``base`` + merged task vector).
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError, MergeError
from llm_merging.ops._common import (
    PerModel,
    check_pair,
    check_range,
    check_tensors,
    dot64,
    f32,
    norm64,
    weight_list,
)

_NUSLERP_NORM_EPS = 1e-7  # mergekit nuslerp ``_normalize``: x / max(‖x‖, 1e-7)
_CHUNK = 1 << 22  # elements per float64 block in the per-vector reductions


def _weighted_sum(tensors: Iterable[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``Σ cᵢ xᵢ`` in float32, each product rounded before it is added (as mergekit's
    ``(x * w).sum(0)``), so that exactly opposite terms cancel to exactly 0. ``tensors`` may be a
    generator (one term in memory at a time)."""
    out: Optional[Tensor] = None
    for t, c in zip(tensors, coefficients):
        term = t * float(c)
        out = term if out is None else out.add_(term)
    assert out is not None
    return out


def _check_base(base: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if base is None:
        return None
    check_pair(like, base, ("tensors[0]", "base"))
    if base.is_complex():
        raise ConfigError("base: complex tensors are not supported")
    return f32(base)


def _check_int(value: object, name: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# NuSLERP
# --------------------------------------------------------------------------------------------------


def _vector_stats(x0: Tensor, x1: Tensor, columns: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-vector ‖x0‖, ‖x1‖, ⟨x0, x1⟩ in float64 of 2-D ``x0``, ``x1``: vectors are the rows, or the
    columns when ``columns``. Processed in blocks of about ``_CHUNK`` elements."""
    if columns:
        length, count = x0.shape
    else:
        count, length = x0.shape
    step = max(1, _CHUNK // max(length, 1))
    out = torch.empty((3, count), dtype=torch.float64, device=x0.device)
    for s in range(0, count, step):
        sl = (slice(None), slice(s, s + step)) if columns else (slice(s, s + step), slice(None))
        a, b = x0[sl].to(torch.float64), x1[sl].to(torch.float64)
        dim = 0 if columns else 1
        out[0, s : s + step] = (a * a).sum(dim)
        out[1, s : s + step] = (b * b).sum(dim)
        out[2, s : s + step] = (a * b).sum(dim)
    return out[0].sqrt(), out[1].sqrt(), out[2]


def _nuslerp_coefficients(n0: Tensor, n1: Tensor, dot: Tensor, t: float, eps: float) -> tuple[Tensor, Tensor]:
    """(s0, s1) with slerp = s0·x0 + s1·x1 per vector, mergekit's ``nuslerp`` branches.

    cos θ and the coefficients are float64; the colinearity test ``1 − cos² ≤ eps²`` is evaluated on cos θ
    rounded to float32, in float32, as mergekit evaluates it on float32 inputs: (anti)parallel vectors
    (|cos θ| within ~3e-8 of 1) always take the linear branch, where the float32 products s0·x0 + s1·x1
    with sin θ → 0 would otherwise cancel catastrophically (near θ = π the slerp limit is not the lerp).
    """
    cos = (dot / (n0.clamp_min(_NUSLERP_NORM_EPS) * n1.clamp_min(_NUSLERP_NORM_EPS))).clamp(-1.0, 1.0)
    cos32 = cos.to(torch.float32)
    colinear = (1.0 - cos32.square()) <= eps * eps
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    s0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    s1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return s0, s1


def _nuslerp_t(weights: PerModel) -> float:
    """NuSLERP's interpolation factor from the two model weights: ``t = w₁ / (w₀ + w₁)``, or 0.5 when
    ``|w₀ + w₁| < 1e-6`` (mergekit ``nuslerp``)."""
    w = weight_list(weights, 2)
    total = w[0] + w[1]
    return 0.5 if abs(total) < 1e-6 else w[1] / total


def nuslerp(
    tensors: Sequence[Tensor],
    weights: Optional[PerModel] = None,
    base: Optional[Tensor] = None,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """NuSLERP (mergekit ``nuslerp``): spherical interpolation of exactly two models.

    ``t = w₁ / (w₀ + w₁)`` from ``weights`` (mergekit ``weight``, required there; ``None`` here means equal
    weights, t = 0.5; a weight sum below 1e-6 in magnitude also gives 0.5; t outside [0, 1]
    extrapolates, as in mergekit). Without ``base`` the two tensors are interpolated; with ``base`` their
    task vectors xᵢ = θᵢ − base are, and ``base`` + the result is returned (weights either way).

    Per vector: ``cos θ = ⟨x₀/max(‖x₀‖, 1e-7), x₁/max(‖x₁‖, 1e-7)⟩`` clamped to [−1, 1]; when
    ``1 − cos²θ ≤ eps²``, evaluated in float32 as mergekit does (|cos θ| within ~3e-8 of 1: parallel
    or antiparallel), the result is ``(1 − t)x₀ + t x₁``, otherwise
    ``(sin((1 − t)θ)·x₀ + sin(tθ)·x₁) / sin θ`` on the unnormalised vectors. A zero vector gives cos θ = 0,
    so θ = π/2 (mergekit's rule, not a linear fallback). Vectors: ``flatten=True`` (mergekit
    ``nuslerp_flatten``, default true): the whole tensor is one vector; ``flatten=False``: each slice
    along the last dimension (each row of a matrix), or with ``row_wise=True`` (mergekit
    ``nuslerp_row_wise``, default false) each slice along dimension 0 (each column of a matrix: mergekit
    transposes dim 0 to the end, despite the option's name).
    """
    ts = check_tensors(tensors, "tensors", min_count=2)
    if len(ts) != 2:
        raise ConfigError(f"tensors: nuslerp takes exactly 2 models, got {len(ts)}")
    t = _nuslerp_t(weights)
    e = check_range(eps, "eps", 0.0, 1.0)
    b = _check_base(base, ts[0])
    x0, x1 = f32(ts[0]), f32(ts[1])
    if b is not None:
        x0, x1 = x0 - b, x1 - b
    shape = x0.shape
    if flatten or x0.dim() <= 1:
        n0, n1, dot = norm64(x0), norm64(x1), dot64(x0, x1)
        s0, s1 = _nuslerp_coefficients(
            torch.tensor(n0, dtype=torch.float64),
            torch.tensor(n1, dtype=torch.float64),
            torch.tensor(dot, dtype=torch.float64),
            t,
            e,
        )
        out = x0 * float(s0) + x1 * float(s1)
    else:
        columns = bool(row_wise)
        if columns:
            m0, m1 = x0.reshape(shape[0], -1), x1.reshape(shape[0], -1)
        else:
            m0, m1 = x0.reshape(-1, shape[-1]), x1.reshape(-1, shape[-1])
        s0, s1 = _nuslerp_coefficients(*_vector_stats(m0, m1, columns), t, e)
        view = (1, -1) if columns else (-1, 1)
        s0 = s0.to(torch.float32).view(view)
        s1 = s1.to(torch.float32).view(view)
        out = (m0 * s0 + m1 * s1).reshape(shape)
    return out + b if b is not None else out


# --------------------------------------------------------------------------------------------------
# Multi-SLERP
# --------------------------------------------------------------------------------------------------


def multislerp(
    tensors: Sequence[Tensor],
    weights: Optional[PerModel] = None,
    base: Optional[Tensor] = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Multi-SLERP (mergekit ``multislerp``; C. Goddard, "Multi-SLERP",
    https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): barycentric interpolation of any number
    of models on the hypersphere.

    Vectors xᵢ are the flattened tensors, or their task vectors ``θᵢ − base`` when ``base`` is given (the
    result is then ``base`` + merged; weights are returned either way). ``weights`` (mergekit ``weight``,
    required there; ``None`` = equal) are divided by their sum when ``normalize_weights`` (mergekit
    default true; a zero sum is a :class:`ConfigError`, where mergekit returns NaN). With uᵢ =
    xᵢ/(‖xᵢ‖ + eps) and ``M = Σ wᵢuᵢ``, mergekit projects the uᵢ onto the tangent space at m = M/‖M‖,
    averages there and maps back with the exponential map; the weighted tangent average
    ``Σ wᵢ(uᵢ − ⟨uᵢ, m⟩m) = M − ‖M‖m`` is identically zero, so the result is exactly

        ``m · Σ wᵢ‖xᵢ‖``  (the weighted mean direction, scaled to the weighted mean norm),

    which is what is computed here (mergekit's float32 rounding of that zero vector aside). One model:
    returned unchanged. ``‖M‖ < eps`` (weights balancing antipodal inputs): with two models the linear
    ``w₀x₀ + w₁x₁`` as mergekit; with more, mergekit raises and so does this (:class:`MergeError`),
    except when every xᵢ is zero (e.g. no expert changed this tensor), which gives 0 (i.e. ``base``).
    """
    ts = check_tensors(tensors, "tensors")
    n = len(ts)
    w = weight_list(weights, n)
    e = check_range(eps, "eps", 0.0, 1.0)
    b = _check_base(base, ts[0])
    if n == 1:
        return f32(ts[0]).clone()
    if normalize_weights:
        total = sum(w)
        if total == 0.0:
            raise ConfigError(f"weights: sum is 0, cannot normalise {w} (use normalize_weights=False)")
        w = [x / total for x in w]
    xs = [f32(t) - b for t in ts] if b is not None else [f32(t) for t in ts]
    norms = [norm64(x) for x in xs]
    if all(nx == 0.0 for nx in norms):
        out = torch.zeros_like(xs[0])
    else:
        mean = _weighted_sum((x / (nx + e) for x, nx in zip(xs, norms)), w)
        mean_norm = norm64(mean)
        if mean_norm < e:
            if n != 2:
                raise MergeError(
                    "multislerp: the weighted mean of the normalised inputs is zero (antipodal inputs whose "
                    "weights balance out); use different weights"
                )
            out = _weighted_sum(xs, w)
        else:
            avg_norm = sum(wi * nx for wi, nx in zip(w, norms))
            out = mean.mul_(avg_norm / mean_norm)
    return out.add_(b) if b is not None else out


# --------------------------------------------------------------------------------------------------
# Karcher mean
# --------------------------------------------------------------------------------------------------


def karcher(
    tensors: Sequence[Tensor],
    weights: Optional[PerModel] = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> Tensor:
    """Weighted Karcher (Riemannian) mean on the unit hypersphere, rescaled (mergekit ``karcher``,
    reference arXiv:2603.04972; Karcher 1977).

    Takes whole weights and returns weights: mergekit's ``karcher`` ignores the base role and averages
    every input it is given (the base model too when a recipe names one, since mergekit adds the base to
    the inputs), with equal weights. ``weights`` (not a mergekit parameter; ``None`` = equal, as mergekit)
    must be ≥ 0 with a positive sum and are normalised to αᵢ summing to 1.

    With uᵢ = xᵢ/‖xᵢ‖ (flattened) over the inputs with ‖xᵢ‖ > ``tol`` and αᵢ > 0 (weights renormalised
    over them to α̂ᵢ): start from m = normalise(Σ α̂ᵢuᵢ) (the first such uᵢ when that sum's norm is
    < ``tol``), then up to ``max_iter`` times: θᵢ = arccos(clamp(⟨m, uᵢ⟩)), tangent
    ``v = Σ α̂ᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m)`` over the i with θᵢ ≥ ``tol``; stop when ‖v‖ < ``tol``, else
    ``m ← normalise(cos‖v‖·m + sin‖v‖·v/‖v‖)``. Result ``(Σᵢ αᵢ‖xᵢ‖) · m`` (all inputs in the norm
    average); all inputs (near) zero → 0. mergekit defaults: ``max_iter`` 10, ``tol`` 1e-5 (absolute, on
    norms and angles).

    One addition: an input at the antipode of m (π − θᵢ < ``tol``, where the logarithm map is undefined)
    adds no tangent term. mergekit keeps it, and its θ/sin θ ≈ 1e7–1e16 then multiplies rounding noise,
    so its result for (near-)antipodal inputs is arbitrary; here e.g. two exactly opposite inputs give the
    first one's direction (mergekit's starting point) deterministically.
    """
    ts = check_tensors(tensors, "tensors")
    n = len(ts)
    w = weight_list(weights, n)
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights: must be >= 0 with a positive sum, got {w}")
    iters = _check_int(max_iter, "max_iter")
    eps = check_range(tol, "tol", 0.0, 1.0)
    if n == 1:
        return f32(ts[0]).clone()
    total = sum(w)
    alphas = [x / total for x in w]
    xs = [f32(t) for t in ts]
    norms = [norm64(x) for x in xs]
    valid = [i for i in range(n) if norms[i] > eps and alphas[i] > 0]
    if not valid:
        return torch.zeros_like(xs[0])
    a_sum = sum(alphas[i] for i in valid)
    a_hat = [alphas[i] / a_sum for i in valid]
    units = [xs[i] / norms[i] for i in valid]

    mean = _weighted_sum(units, a_hat)
    mean_norm = norm64(mean)
    mean = units[0].clone() if mean_norm < eps else mean.div_(mean_norm)
    for _ in range(iters):
        tangent = torch.zeros_like(mean)
        mean_norm = norm64(mean)
        if mean_norm == 0.0:
            break
        for a, u, x, nx in zip(a_hat, units, (xs[i] for i in valid), (norms[i] for i in valid)):
            cos = max(-1.0, min(1.0, dot64(mean, x) / (nx * mean_norm)))
            theta = math.acos(cos)
            if theta < eps or math.pi - theta < eps:
                continue
            tangent.add_(u - mean * cos, alpha=a * theta / math.sin(theta))
        tangent_norm = norm64(tangent)
        if tangent_norm < eps:
            break
        mean = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        unit_norm = norm64(mean)
        if unit_norm > eps:
            mean.div_(unit_norm)
    scale = sum(a * nx for a, nx in zip(alphas, norms))
    return mean.mul_(scale)
