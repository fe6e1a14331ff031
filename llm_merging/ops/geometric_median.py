"""Weighted geometric median by the Weiszfeld algorithm with the Vardi–Zhang fix.

Weiszfeld (1937); Vardi & Zhang (2000), "The multivariate L1-median and associated data depth" (the
modified step that stays correct when an iterate coincides with a data point). As a model-merging
aggregator: e.g. RFA (Pillutla et al. 2022) and the "geometric median" merging of task vectors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import PerModel, check_range, check_tensors, norm64, stack_f32, weight_list


def _norm(x: Tensor) -> float:
    return norm64(x)


def geometric_median(
    tensors: Sequence[Tensor],
    weights: Optional[PerModel] = None,
    eps: float = 1e-6,
    max_iter: int = 100,
) -> Tensor:
    """Weighted geometric median ``argmin_z Σ wᵢ ‖xᵢ − z‖`` of the flattened tensors.

    Weiszfeld iteration from the weighted mean: ``z ← Σ (wᵢ/dᵢ) xᵢ / Σ (wᵢ/dᵢ)``, dᵢ = ‖xᵢ − z‖. When z
    coincides with data points (dᵢ ≤ 1e-10 × the data spread) their total weight η is handled by the
    Vardi–Zhang step ``z ← (1 − η/r)·T + (η/r)·z`` (r = ‖Σ_{dᵢ>0} wᵢ (xᵢ − z)/dᵢ‖), which stops at z when
    r ≤ η (z is then the exact median): no division by zero, no NaN. Stops when
    ``‖z_new − z‖ ≤ eps · max(‖z_new‖, spread)`` (relative change; spread = max ‖xᵢ − mean‖ guards a
    median at the origin) or after ``max_iter`` iterations. Finally, if the data point nearest to z
    satisfies the Vardi–Zhang optimality test it is returned exactly.

    Returns the median itself (float32, same shape), not a task vector; the median is
    translation-equivariant, so task vectors can be passed and θ₀ added afterwards. Weights must be ≥ 0
    with a positive sum. Memory: the stacked inputs plus O(one tensor).
    """
    ts = check_tensors(tensors, "tensors")
    n = len(ts)
    w = weight_list(weights, n)
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights: must be >= 0 with a positive sum, got {w}")
    tol = check_range(eps, "eps", 0.0, 1.0, low_open=True)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ConfigError(f"max_iter: expected a non-negative integer, got {max_iter!r}")

    shape = ts[0].shape
    xs = stack_f32(ts).reshape(n, -1)
    wsum = sum(w)
    z = torch.zeros_like(xs[0])
    for wi, x in zip(w, xs):
        if wi:
            z.add_(x, alpha=wi / wsum)
    if n == 1:
        return z.reshape(shape)
    spread = max(_norm(x - z) for x in xs)
    if spread == 0.0:  # all points identical
        return z.reshape(shape)
    coincide_tol = 1e-10 * spread

    def weiszfeld_terms(d: list[float]) -> tuple[float, float, Tensor]:
        """(η = weight of points coinciding with z, Σ cᵢ, Σ cᵢxᵢ over the others), cᵢ = wᵢ/dᵢ."""
        eta, csum = 0.0, 0.0
        acc = torch.zeros_like(xs[0])
        for wi, di, x in zip(w, d, xs):
            if di <= coincide_tol:
                eta += wi
            elif wi:
                c = wi / di
                csum += c
                acc.add_(x, alpha=c)
        return eta, csum, acc

    for _ in range(max_iter):
        d = [_norm(x - z) for x in xs]
        eta, csum, acc = weiszfeld_terms(d)
        if csum == 0.0:  # every weighted point coincides with z
            break
        t_point = acc / csum
        if eta > 0.0:
            r = csum * _norm(t_point - z)
            if r <= eta:
                break
            z_new = t_point * (1.0 - eta / r) + z * (eta / r)
        else:
            z_new = t_point
        change = _norm(z_new - z)
        z = z_new
        if change <= tol * max(_norm(z), spread):
            break

    # Snap to the nearest data point when it is the exact median (the median is often a data point).
    d = [_norm(x - z) for x in xs]
    xj = xs[min(range(n), key=d.__getitem__)]
    dj = [_norm(x - xj) for x in xs]
    eta_j = sum(wi for wi, di in zip(w, dj) if di <= coincide_tol)
    r_vec = torch.zeros_like(z)
    for wi, di, x in zip(w, dj, xs):
        if di > coincide_tol and wi:
            r_vec.add_(x - xj, alpha=wi / di)
    if eta_j > 0 and _norm(r_vec) <= eta_j:
        z = xj.clone()
    return z.reshape(shape)
