"""Tests for the mergekit 0.1.5 methods in llm_merging.ops (nuslerp, multislerp, karcher, sce, ram,
ramplus_tl, nearswap, arcee_fusion): each against an independent NumPy float64 / Python-loop
reimplementation of mergekit's definition (mergekit itself is not a dependency and is never imported),
plus edge cases (identical, (anti)parallel, zero inputs) and the ConfigErrors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_merging import ops
from llm_merging.core.errors import ConfigError, MergeError

SHAPES = [(7,), (5, 9), (3, 4, 6)]


def rand(n, shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


def np64(t):
    return t.detach().to(torch.float64).cpu().numpy()


def rel_close(a, b, rtol=2e-6):
    """Norm-relative closeness (as a recipe comparison would measure it), plus elementwise atol."""
    a = np64(a) if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = np64(b) if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = max(np.linalg.norm(b), 1e-30)
    assert np.linalg.norm(a - b) <= rtol * scale, (np.linalg.norm(a - b) / scale)


# --------------------------------------------------------------------------------------------------
# references (NumPy float64, written from mergekit 0.1.5's source)
# --------------------------------------------------------------------------------------------------


def ref_nuslerp(t, v0, v1, dim=-1, flatten=False, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = np.swapaxes(v0, dim, -1), np.swapaxes(v1, dim, -1)

    def unit(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = np.clip(np.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos**2) <= eps**2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        res = (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)
    res = np.where(colinear, (1 - t) * v0 + t * v1, res)
    if dim != -1 and not flatten:
        res = np.swapaxes(res, dim, -1)
    return res.reshape(shape)


def ref_nuslerp_method(tensors, weights, base=None, row_wise=False, flatten=True):
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    x0, x1 = np64(tensors[0]), np64(tensors[1])
    dim = 0 if row_wise else -1
    if base is None:
        return ref_nuslerp(t, x0, x1, dim, flatten)
    b = np64(base)
    return b + ref_nuslerp(t, x0 - b, x1 - b, dim, flatten)


def ref_multislerp(tensors, weights, base=None, normalize=True, eps=1e-8):
    """mergekit's algorithm literally: tangent projection at the mean, exponential map back."""
    if len(tensors) == 1:
        return np64(tensors[0])
    x = np.stack([np64(t) for t in tensors])
    if base is not None:
        x = x - np64(base)
    flat = x.reshape(len(tensors), -1)
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if np.linalg.norm(mean) < eps:
        assert len(tensors) == 2
        res = (flat[0] * w[0] + flat[1] * w[1]).reshape(x.shape[1:])
    else:
        mean = mean / np.linalg.norm(mean)
        dots = (units * mean).sum(-1, keepdims=True)
        tangent = ((units - dots * mean) * w[:, None]).sum(0)
        tn = np.linalg.norm(tangent) + eps
        res = mean * np.cos(tn) + tangent * (np.sin(tn) / tn)
        res = (res * (norms[:, 0] * w).sum()).reshape(x.shape[1:])
    return res + np64(base) if base is not None else res


def ref_karcher(tensors, alphas=None, max_iter=10, tol=1e-5):
    xs = [np64(t).reshape(-1) for t in tensors]
    n = len(xs)
    alphas = [1.0 / n] * n if alphas is None else list(alphas)
    if n == 1:
        return xs[0].reshape(tensors[0].shape)
    norms = [np.linalg.norm(x) for x in xs]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros(tensors[0].shape)
    s = sum(alphas[i] for i in valid)
    a = [alphas[i] / s for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, units))
    mn = np.linalg.norm(mean)
    mean = units[0].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for ai, u in zip(a, units):
            d = np.clip(mean @ u, -1.0, 1.0)
            th = np.arccos(d)
            if th < tol:
                continue
            tangent += ai * (th / np.sin(th)) * (u - d * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = np.cos(tn) * mean + np.sin(tn) * tangent / tn
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    scale = sum(ai * ni for ai, ni in zip(alphas, norms))
    return (scale * mean).reshape(tensors[0].shape)


def ref_sce(tvs, select_topk=1.0):
    """Entry-by-entry SCE with Python loops; top-k ties to the lower flat index."""
    shape = tvs[0].shape
    x = [np64(t).reshape(-1) for t in tvs]
    n, m = len(x), x[0].size
    if select_topk < 1:
        var = [float(np.var([x[i][j] for i in range(n)])) for j in range(m)]
        if select_topk <= 0:
            k = 0
        else:
            k = int(np.float32(sum(v != 0 for v in var)) * np.float32(select_topk))
        keep = set(sorted(range(m), key=lambda j: (-var[j], j))[:k])
        x = [np.array([xi[j] if j in keep else 0.0 for j in range(m)]) for xi in x]
    ms = [float(np.mean(xi**2)) for xi in x]
    total = sum(ms)
    eta = [1.0 / n] * n if abs(total) < 1e-6 else [v / total for v in ms]
    out = np.zeros(m)
    for j in range(m):
        g = 1.0 if sum(xi[j] for xi in x) >= 0 else -1.0
        agree = [i for i in range(n) if np.sign(x[i][j]) == g]
        num = sum(eta[i] * x[i][j] for i in agree)
        den = sum(eta[i] for i in agree)
        out[j] = num / max(den, 1e-6)
    return out.reshape(shape)


def ref_ram(tvs, epsilon=1e-5, r=None, alpha=None):
    """RAM (r is None) or RAM+ tensor-local, entry by entry."""
    shape = tvs[0].shape
    x = [np64(t).reshape(-1) for t in tvs]
    n, m = len(x), x[0].size
    act = [[abs(x[i][j]) > epsilon for j in range(m)] for i in range(n)]
    count = [sum(act[i][j] for i in range(n)) for j in range(m)]
    lam = [1.0] * n
    if r is not None:
        for i in range(n):
            shared = sum(act[i][j] and count[j] > 1 for j in range(m))
            unique = sum(act[i][j] and count[j] == 1 for j in range(m))
            den = max(unique, epsilon)
            rho = shared / den if den > 0 else 0.0
            lam[i] = 1 + r * min(max(rho, 0.0), alpha)
    out = np.zeros(m)
    for j in range(m):
        for i in range(n):
            if act[i][j]:
                out[j] += x[i][j] * lam[i] if count[j] == 1 else x[i][j] / count[j]
    return out.reshape(shape)


def ref_nearswap(base, model, t):
    a, b = np64(base), np64(model)
    w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a


def ref_arcee_importance(base, model):
    a, b = np64(base), np64(model)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    return np.abs(b - a) * kl


def ref_arcee_threshold(importance):
    s = np.sort(np.asarray(importance, dtype=np.float64).reshape(-1))
    q1, med, q3 = (s[int(math.floor(q * (s.size - 1)))] for q in (0.25, 0.5, 0.75))
    return med + 1.5 * (q3 - q1)


# --------------------------------------------------------------------------------------------------
# nuslerp
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(12, 10)])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [[0.3, 0.7], [1.0, 1.0], [2.0, -0.5]])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_matches_reference(shape, flatten, row_wise, weights, with_base):
    base = rand(1, shape, 1)[0]
    xs = rand(2, shape, 2) if not with_base else [base + d for d in rand(2, shape, 3, 0.1)]
    b = base if with_base else None
    out = ops.nuslerp(xs, weights, b, row_wise=row_wise, flatten=flatten)
    assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
    rel_close(out, ref_nuslerp_method(xs, weights, b, row_wise=row_wise, flatten=flatten))


def test_nuslerp_endpoints_weights_and_options():
    a, b = rand(2, (6, 5), 4)
    rel_close(ops.nuslerp([a, b], [1.0, 0.0]), a, 1e-6)
    rel_close(ops.nuslerp([a, b], [0.0, 2.0]), b, 1e-6)
    # scalar weight and None both mean t = 0.5; a zero weight sum too (mergekit's rule)
    half = ops.nuslerp([a, b], None)
    rel_close(ops.nuslerp([a, b], 3.0), half, 1e-7)
    rel_close(ops.nuslerp([a, b], [1.0, -1.0]), half, 1e-7)
    # row-wise = vectors along dim 0 (columns of a matrix): per-column slerp
    out = ops.nuslerp([a, b], [1, 3], flatten=False, row_wise=True)
    for j in range(a.shape[1]):
        col = ops.nuslerp([a[:, j], b[:, j]], [1, 3])
        rel_close(out[:, j], col, 1e-6)
    out = ops.nuslerp([a, b], [1, 3], flatten=False)
    for i in range(a.shape[0]):
        rel_close(out[i], ops.nuslerp([a[i], b[i]], [1, 3]), 1e-6)


def test_nuslerp_edge_cases():
    x = rand(1, (4, 6), 5)[0]
    z = torch.zeros(4, 6)
    rel_close(ops.nuslerp([x, x], [1, 2]), x, 1e-6)  # identical
    rel_close(ops.nuslerp([x, 3 * x], [1, 1]), 2 * x, 1e-6)  # parallel: linear
    rel_close(ops.nuslerp([x, -x], [1, 2]), -x / 3, 1e-6)  # antiparallel: linear
    rows = ops.nuslerp([x, -2 * x], [1, 2], flatten=False)  # every row antiparallel
    rel_close(rows, -x, 1e-6)
    # a zero vector has cos θ = 0, so θ = π/2 (mergekit's rule): sin(tπ/2)·x
    rel_close(ops.nuslerp([z, x], [1, 1]), math.sin(math.pi / 4) * x, 1e-6)
    assert torch.equal(ops.nuslerp([z, z], [1, 1]), z)
    # with a base, identical experts return that expert; experts equal to the base return the base
    base = rand(1, (4, 6), 6)[0]
    rel_close(ops.nuslerp([x, x], [1, 2], base), x, 1e-6)
    rel_close(ops.nuslerp([base, base], [1, 2], base), base, 1e-7)


# --------------------------------------------------------------------------------------------------
# multislerp
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_matches_reference(shape, n, normalize, with_base):
    w = [0.5, 0.3, 0.9, 0.2, 1.1][:n]
    base = rand(1, shape, 7)[0]
    xs = rand(n, shape, 8) if not with_base else [base + d for d in rand(n, shape, 9, 0.1)]
    b = base if with_base else None
    out = ops.multislerp(xs, w, b, normalize_weights=normalize)
    assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
    rel_close(out, ref_multislerp(xs, w, b, normalize))


def test_multislerp_closed_form_and_edges():
    xs = rand(3, (5, 4), 10)
    w = [1.0, 2.0, 0.5]
    # mergekit's tangent-space average is identically zero: mean direction × mean norm
    ws = np.array(w) / sum(w)
    units = [np64(x) / np.linalg.norm(np64(x)) for x in xs]
    m = sum(wi * u for wi, u in zip(ws, units))
    avg_norm = sum(wi * np.linalg.norm(np64(x)) for wi, x in zip(ws, xs))
    rel_close(ops.multislerp(xs, w), m / np.linalg.norm(m) * avg_norm)
    x = xs[0]
    rel_close(ops.multislerp([x, x, x], w), x, 1e-6)  # identical
    assert torch.equal(ops.multislerp([x], [3.0]), x)  # one model: unchanged
    assert torch.equal(ops.multislerp([x, -x], [1, 1]), torch.zeros_like(x))  # antipodal pair: linear
    base = xs[1]
    assert torch.equal(ops.multislerp([base, base, base], w, base), base)  # nothing changed: the base
    rel_close(ops.multislerp([base, base], [1, 1], base), base, 1e-7)
    with pytest.raises(MergeError):  # antipodal inputs whose weights balance out, more than two models
        ops.multislerp([x, -x, xs[2]], [1, 1, 0])


# --------------------------------------------------------------------------------------------------
# karcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("max_iter", [1, 10, 50])
@pytest.mark.parametrize("correlated", [False, True])
def test_karcher_matches_reference(shape, n, max_iter, correlated):
    base = rand(1, shape, 11)[0]
    xs = [base + d for d in rand(n, shape, 12, 0.2)] if correlated else rand(n, shape, 13)
    out = ops.karcher(xs, max_iter=max_iter)
    assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
    rel_close(out, ref_karcher(xs, max_iter=max_iter))


def test_karcher_weights_and_stationarity():
    xs = rand(3, (8, 3), 14)
    rel_close(ops.karcher(xs, [3.0, 1.0, 0.0]), ref_karcher(xs, [0.75, 0.25, 0.0]))
    # converged: the weighted Riemannian gradient Σ αᵢ log_m(uᵢ) vanishes at the result's direction
    w = np.array([0.2, 0.5, 0.3])
    out = np64(ops.karcher(xs, list(w), max_iter=200, tol=1e-9)).reshape(-1)
    m = out / np.linalg.norm(out)
    grad = np.zeros_like(m)
    for wi, x in zip(w, xs):
        u = np64(x).reshape(-1) / np.linalg.norm(np64(x))
        th = np.arccos(np.clip(m @ u, -1, 1))
        grad += wi * th / np.sin(th) * (u - (m @ u) * m)
    assert np.linalg.norm(grad) < 1e-5
    avg_norm = sum(wi * np.linalg.norm(np64(x)) for wi, x in zip(w, xs))
    assert np.linalg.norm(out) == pytest.approx(avg_norm, rel=1e-6)


def test_karcher_edge_cases():
    x, y = rand(2, (4, 6), 15)
    z = torch.zeros(4, 6)
    rel_close(ops.karcher([x, x, x]), x, 1e-6)  # identical
    rel_close(ops.karcher([x, -x]), x, 1e-6)  # antipodal: the first direction, deterministically
    assert torch.equal(ops.karcher([z, z]), z)  # all zero
    rel_close(ops.karcher([z, x, x]), 2 * x / 3, 1e-6)  # a zero input only lowers the mean norm
    rel_close(ops.karcher([x, 2 * x]), 1.5 * x, 1e-6)  # parallel
    rel_close(ops.karcher([x, y], max_iter=0), ref_karcher([x, y], max_iter=0))


# --------------------------------------------------------------------------------------------------
# sce
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.1, 0.0])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # mean squares above / below mergekit's 1e-6 threshold
def test_sce_matches_reference(shape, n, select_topk, scale):
    tvs = rand(n, shape, 16, scale)
    ref = ref_sce(tvs, select_topk)
    for stable in (False, True):  # no ties in continuous data: both tie rules agree
        out = ops.sce(tvs, select_topk, stable_ties=stable)
        assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
        np.testing.assert_allclose(np64(out), ref, rtol=1e-5, atol=1e-7 * scale)


def test_sce_ties_weights_and_edges():
    g = torch.Generator().manual_seed(17)
    # many exactly tied variances (values whose float32 variances tie exactly, not just in theory)
    pair = [torch.randint(-1, 2, (6, 8), generator=g).float() for _ in range(2)]
    triple = [torch.randint(0, 2, (6, 8), generator=g).float() * 2 - 1 for _ in range(3)]
    for tvs in (pair, triple):
        for frac in (0.2, 0.4, 0.75):
            out = ops.sce(tvs, frac, stable_ties=True)
            np.testing.assert_allclose(np64(out), ref_sce(tvs, frac), rtol=1e-6, atol=1e-7)
    tvs = triple
    mask = ops.sce_mask(tvs, 0.4)
    nonzero = int(torch.count_nonzero(torch.var(torch.stack(tvs), dim=0, unbiased=False)))
    assert int(mask.sum()) == int(np.float32(nonzero) * np.float32(0.4))
    # weights: mean squares normalised, equal weights when their sum is below 1e-6
    a = torch.tensor([1.0, 1.0])
    b = torch.tensor([3.0, 3.0])
    np.testing.assert_allclose(np64(ops.sce([a, b])), [(1 * 1 + 9 * 3) / 10] * 2, rtol=1e-6)
    np.testing.assert_allclose(np64(ops.sce([a * 1e-4, b * 1e-4])), [2e-4] * 2, rtol=1e-6)
    x = tvs[0]
    rel_close(ops.sce([x, x]), x, 1e-7)  # identical, all kept
    assert torch.equal(ops.sce([x, x], 0.5), torch.zeros_like(x))  # no variance: nothing selected
    rel_close(ops.sce([x], 1.0), x, 1e-7)
    assert torch.equal(ops.sce([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


# --------------------------------------------------------------------------------------------------
# ram / ramplus_tl
# --------------------------------------------------------------------------------------------------


def sparse_tvs(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = torch.randn(shape, generator=g) * 0.01 * (torch.rand(shape, generator=g) < 0.5)
        out.append(d + (torch.rand(shape, generator=g) < 0.1) * 3e-6)  # some below epsilon
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ram_matches_reference(shape, n):
    tvs = sparse_tvs(n, shape, 18)
    out = ops.ram(tvs)
    assert out.dtype == torch.float32 and out.shape == torch.Size(shape)
    np.testing.assert_allclose(np64(out), ref_ram(tvs), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(np64(ops.ram(tvs, epsilon=0.0)), ref_ram(tvs, 0.0), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize(
    "r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.5, 1.0, 1e-5), (2.0, 5.0, 1e-3), (1.0, 100.0, 0.0)]
)
def test_ramplus_tl_matches_reference(shape, n, r, alpha, epsilon):
    tvs = sparse_tvs(n, shape, 19)
    out = ops.ramplus_tl(tvs, r=r, alpha=alpha, epsilon=epsilon)
    ref = ref_ram(tvs, epsilon, r, alpha)
    np.testing.assert_allclose(np64(out), ref, rtol=1e-6, atol=1e-10)


def test_ram_edge_cases():
    a = torch.tensor([1.0, 0.0, 2.0, 1e-6])
    b = torch.tensor([3.0, 0.0, 0.0, 5.0])
    assert ops.ram([a, b]).tolist() == [2.0, 0.0, 2.0, 5.0]  # overlap mean, unique kept, ≤ ε dropped
    # RAM+: a has 1 shared + 1 unique entry (ρ = 1 → λ = 1 + 0.1·0.2), b 1 shared + 1 unique (the 1e-6
    # of a is inactive, so b's 5.0 is unique)
    np.testing.assert_allclose(np64(ops.ramplus_tl([a, b])), [2.0, 0.0, 2.0 * 1.02, 5.0 * 1.02], rtol=1e-6)
    z = torch.zeros(4)
    assert torch.equal(ops.ram([z, z]), z) and torch.equal(ops.ramplus_tl([z, z]), z)
    assert torch.equal(ops.ramplus_tl([a, a]), a.where(a.abs() > 1e-5, 0.0))  # identical: all shared


# --------------------------------------------------------------------------------------------------
# nearswap / arcee_fusion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.1, 10.0])
def test_nearswap_matches_reference(shape, t):
    base = rand(1, shape, 20)[0]
    model = base + rand(1, shape, 21, 0.1)[0]
    out = ops.nearswap(base, model, t)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(np64(out), ref_nearswap(base, model, t), rtol=1e-6, atol=1e-7)


def test_nearswap_edges():
    base = torch.tensor([0.0, 1.0, 2.0])
    model = torch.tensor([0.05, 1.0, 3.0])
    assert torch.equal(ops.nearswap(base, model, 0.0), base)
    assert torch.equal(ops.nearswap(base, model, 1e6), model)
    np.testing.assert_allclose(np64(ops.nearswap(base, model, 0.1)), [0.05, 1.0, 2.1], rtol=1e-6)
    assert torch.equal(ops.nearswap(base, base, 0.5), base)


@pytest.mark.parametrize("shape", SHAPES + [(40, 30)])
@pytest.mark.parametrize("seed", [0, 1])
def test_arcee_fusion_matches_reference(shape, seed):
    base = rand(1, shape, 22 + seed)[0]
    model = base + rand(1, shape, 30 + seed, 0.3)[0]
    imp = ops.arcee_fusion_importance(base, model)
    np.testing.assert_allclose(np64(imp), ref_arcee_importance(base, model), rtol=1e-4, atol=1e-8)
    thr = ref_arcee_threshold(np64(imp))  # on the float32 scores, with NumPy's sort
    mask = np64(imp) >= thr
    out = ops.arcee_fusion(base, model)
    np.testing.assert_array_equal(np64(out), np64(base) + (np64(model) - np64(base)) * mask)
    # independently of the float32 scores: the float64 mask agrees away from the threshold
    ref_imp = ref_arcee_importance(base, model)
    ref_thr = ref_arcee_threshold(ref_imp)
    far = np.abs(ref_imp - ref_thr) > 1e-4 * max(abs(ref_thr), 1e-12)
    took = np64(out) == np64(model)
    moved = np64(model) != np64(base)
    np.testing.assert_array_equal((took & moved)[far], ((ref_imp >= ref_thr) & moved)[far])


def test_arcee_fusion_edges():
    x = rand(1, (5, 6), 40)[0]
    assert torch.equal(ops.arcee_fusion(x, x), x)  # identical: importance 0 everywhere
    # one row changed a lot: its entries are importance outliers and are taken, the rest keeps the base
    model = x + 0.01 * rand(1, (5, 6), 41)[0]
    model[2] += torch.linspace(3.0, 5.0, 6)
    out = ops.arcee_fusion(x, model)
    assert torch.equal(out[2], (x + (model - x))[2]) and torch.equal(out[[0, 1, 4]], x[[0, 1, 4]])
    # most entries unchanged: the quartiles are 0, so every changed entry (importance ≥ 0) is taken
    sparse = x.clone()
    sparse[0, 0] += 1e-3
    sparse[3, 2] -= 1.0
    assert torch.equal(ops.arcee_fusion(x, sparse), x + (sparse - x))


# --------------------------------------------------------------------------------------------------
# conventions and errors
# --------------------------------------------------------------------------------------------------

CALLS = {
    "nuslerp": lambda xs: ops.nuslerp(xs[:2], [1, 2], xs[2]),
    "multislerp": lambda xs: ops.multislerp(xs[:2], [1, 2], xs[2]),
    "karcher": lambda xs: ops.karcher(xs),
    "sce": lambda xs: ops.sce(xs, 0.5),
    "ram": lambda xs: ops.ram(xs),
    "ramplus_tl": lambda xs: ops.ramplus_tl(xs),
    "nearswap": lambda xs: ops.nearswap(xs[0], xs[1], 0.1),
    "arcee_fusion": lambda xs: ops.arcee_fusion(xs[0], xs[1]),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_untouched_and_float32_out(name, dtype):
    xs = [t.to(dtype) for t in rand(3, (4, 5), 41)]
    before = [t.clone() for t in xs]
    out = CALLS[name](xs)
    assert out.dtype == torch.float32 and out.shape == (4, 5) and torch.isfinite(out).all()
    for a, b in zip(xs, before):
        assert torch.equal(a, b)
    for x in xs:  # results never alias an input
        assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    "call,param",
    [
        (lambda a, b, c: ops.nuslerp([a, b, c], [1, 1, 1]), "tensors"),
        (lambda a, b, c: ops.nuslerp([a], [1]), "tensors"),
        (lambda a, b, c: ops.nuslerp([a, b], [1, 2, 3]), "weights"),
        (lambda a, b, c: ops.nuslerp([a, b], [1, float("nan")]), "weights[1]"),
        (lambda a, b, c: ops.nuslerp([a, b], 1, c[:2]), "base"),
        (lambda a, b, c: ops.nuslerp([a, b[:2]], 1), "tensors[1]"),
        (lambda a, b, c: ops.nuslerp([a, b], 1, eps=-1.0), "eps"),
        (lambda a, b, c: ops.multislerp([a, b], [1, -1]), "weights"),
        (lambda a, b, c: ops.multislerp([], [1]), "tensors"),
        (lambda a, b, c: ops.multislerp([a, b], [1, 2], c.T), "base"),
        (lambda a, b, c: ops.karcher([a, b], [1, -1]), "weights"),
        (lambda a, b, c: ops.karcher([a, b], [0, 0]), "weights"),
        (lambda a, b, c: ops.karcher([a, b], max_iter=-1), "max_iter"),
        (lambda a, b, c: ops.karcher([a, b], max_iter=True), "max_iter"),
        (lambda a, b, c: ops.karcher([a, b], tol=-1e-5), "tol"),
        (lambda a, b, c: ops.karcher(a), "tensors"),
        (lambda a, b, c: ops.sce([a, b], 1.5), "select_topk"),
        (lambda a, b, c: ops.sce([a, b], -0.1), "select_topk"),
        (lambda a, b, c: ops.sce_mask([a, b], "x"), "select_topk"),
        (lambda a, b, c: ops.sce([a, b[:2]]), "task_vectors[1]"),
        (lambda a, b, c: ops.ram([a, b], epsilon=-1.0), "epsilon"),
        (lambda a, b, c: ops.ramplus_tl([a, b], r=-0.1), "r"),
        (lambda a, b, c: ops.ramplus_tl([a, b], alpha=-1.0), "alpha"),
        (lambda a, b, c: ops.ramplus_tl([a, b], epsilon=float("inf")), "epsilon"),
        (lambda a, b, c: ops.nearswap(a, b, -0.1), "t"),
        (lambda a, b, c: ops.nearswap(a, b, None), "t"),
        (lambda a, b, c: ops.nearswap(a, b[:2], 0.1), "model"),
        (lambda a, b, c: ops.arcee_fusion(a, b.T), "model"),
        (lambda a, b, c: ops.arcee_fusion(a, [1.0]), "model"),
    ],
)
def test_config_errors(call, param):
    a, b, c = rand(3, (3, 4), 42)
    with pytest.raises(ConfigError) as err:
        call(a, b, c)
    assert str(err.value).startswith(param), str(err.value)
