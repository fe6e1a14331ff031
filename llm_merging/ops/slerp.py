"""Spherical linear interpolation of two tensors (Shoemake 1985; mergekit ``slerp``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from llm_merging.ops._common import check_pair, check_range, dot64, f32


def lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Linear interpolation ``(1 − t)·a + t·b`` as a new float32 tensor."""
    check_pair(a, b)
    tt = check_range(t, "t", 0.0, 1.0)
    return torch.lerp(f32(a), f32(b), tt)


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995) -> Tensor:
    """Spherical interpolation of ``a`` and ``b`` treated as flat vectors (mergekit semantics).

    θ = arccos(⟨a/‖a‖, b/‖b‖⟩); result ``sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b`` (the unnormalised
    tensors are interpolated, so norms are interpolated too). Falls back to linear interpolation when a
    norm is ≤ ``eps`` (zero tensors) or when |cos θ| > ``dot_threshold`` (0.9995, mergekit's
    DOT_THRESHOLD: identical, parallel and antiparallel tensors), so the result is never NaN for finite
    inputs. ``t = 0`` returns ``a`` and ``t = 1`` returns ``b`` exactly (as float32). Norms and the dot
    product are accumulated in float64.
    """
    check_pair(a, b)
    tt = check_range(t, "t", 0.0, 1.0)
    af, bf = f32(a), f32(b)
    if tt == 0.0:
        return af.clone()
    if tt == 1.0:
        return bf.clone()
    na, nb = math.sqrt(max(dot64(af, af), 0.0)), math.sqrt(max(dot64(bf, bf), 0.0))
    if na <= eps or nb <= eps:
        return torch.lerp(af, bf, tt)
    cos = max(-1.0, min(1.0, dot64(af, bf) / (na * nb)))
    if abs(cos) > dot_threshold:
        return torch.lerp(af, bf, tt)
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    s0 = math.sin((1.0 - tt) * theta) / sin_theta
    s1 = math.sin(tt * theta) / sin_theta
    return af * s0 + bf * s1
