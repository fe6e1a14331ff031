"""Tests for llm_merging.ops: each function against an independent computation (Python loops / NumPy),
against peft.utils.merge_utils where the semantics coincide, and invariants / error cases.

PEFT correspondence (peft 0.21, ``peft.utils.merge_utils``), used below:
- ``task_arithmetic(τ, w)``            == ``ops.task_arithmetic(τ, w)`` (scale 1).
- ``magnitude_prune(τ, w, d)``         == ``ops.magnitude_prune(τ, d, w)`` when d·numel is an integer
  (PEFT keeps ``int(d·numel)`` entries via ``topk``; ops keeps ``round(d·numel)``) and |τ| has no ties.
- ``ties(τ, w, d, method)``            == ``ops.ties(τ, d, w, sign_method=method)`` with the defaults
  ``weighted_sign=False, divisor="count"``: PEFT elects the sign over the trimmed *unweighted* vectors,
  multiplies by the weights afterwards and divides by the *number* of agreeing models
  (``disjoint_merge``), exactly the TIES paper rule.
- ``dare_linear`` / ``dare_ties``       == ``ops.dare(..., consensus=None / "ties", rescale="inverse")``
  given the same Bernoulli masks (PEFT draws them with the global RNG via ``torch.bernoulli``; the test
  feeds it the masks ops drew from its seeded CPU generator).
- ``calculate_majority_sign_mask`` + ``disjoint_merge`` == ``ops.consensus_merge`` (count divisor).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft.utils import merge_utils as pm

from llm_merging import ops
from llm_merging.core.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# helpers: independent reference implementations (NumPy / Python loops, float64)
# --------------------------------------------------------------------------------------------------


def rand_tvs(n=3, shape=(5, 7), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


def np64(t):
    return t.detach().to(torch.float64).cpu().numpy()


def ref_topk_mask(x, k):
    """Indices of the k largest |x|, ties to the lower flat index."""
    flat = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    order = sorted(range(flat.size), key=lambda j: (-flat[j], j))
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(x))


def ref_k(density, n):
    if density >= 1:
        return n
    return min(n, max(1, int(math.floor(density * n + 0.5))))


def ref_consensus(vals, weights, sign_method="total", weighted_sign=False, divisor="count"):
    """Entry-by-entry sign election + disjoint merge over a list of equally shaped arrays."""
    shape = vals[0].shape
    flat = [np.asarray(v, dtype=np.float64).reshape(-1) for v in vals]
    out = np.zeros(flat[0].size)
    for e in range(out.size):
        x = [f[e] for f in flat]
        basis = [w * v for w, v in zip(weights, x)] if weighted_sign else x
        if sign_method == "total":
            score = sum(basis)
        else:
            score = sum(np.sign(b) for b in basis)
        g = 1.0 if score >= 0 else -1.0
        agree = [i for i, b in enumerate(basis) if np.sign(b) == g]
        num = sum(weights[i] * x[i] for i in agree)
        if divisor == "count":
            den = max(len(agree), 1)
        elif divisor == "weight_sum":
            den = sum(weights[i] for i in agree)
            den = 1.0 if den == 0 else den
        else:
            den = 1.0
        out[e] = num / den
    return out.reshape(shape)


def ref_ties(tvs, density, weights, scale=1.0, **kw):
    n = len(tvs)
    dens = density if isinstance(density, (list, tuple)) else [density] * n
    trimmed = []
    for t, d in zip(tvs, dens):
        x = np64(t)
        trimmed.append(x * ref_topk_mask(x, ref_k(d, x.size)))
    return scale * ref_consensus(trimmed, weights, **kw)


def ref_rows(x):
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def ref_della_keep(x, density, epsilon):
    rows = ref_rows(np.abs(np.asarray(x, dtype=np.float64)))
    m = rows.shape[1]
    out = np.zeros_like(rows)
    for r in range(rows.shape[0]):
        order = sorted(range(m), key=lambda j: (rows[r, j], j))  # ascending magnitude
        for rank, j in enumerate(order):
            out[r, j] = density if m == 1 else (density - epsilon) + 2 * epsilon * rank / (m - 1)
    return out.reshape(np.shape(x))


def ref_polar(x):
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    return u @ vh


def close(a, b, atol=1e-5, rtol=1e-5):
    a = np64(a) if isinstance(a, torch.Tensor) else np.asarray(a)
    b = np64(b) if isinstance(b, torch.Tensor) else np.asarray(b)
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# linear / task arithmetic
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, [0.2, 0.3, 0.5], [1.0, -0.5, 2.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_loop(weights, normalize):
    ts = rand_tvs(3, (4, 6), seed=1)
    w = weights or [1.0] * 3
    ref = sum(wi * np64(t) for wi, t in zip(w, ts))
    if normalize:
        ref = ref / sum(w)
    close(ops.linear(ts, weights, normalize=normalize), ref)


@pytest.mark.parametrize("weights", [None, [0.5, 2.0, -1.0]])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_task_arithmetic_matches_loop_and_peft(weights, scale):
    ts = rand_tvs(3, (6,), seed=2)
    w = weights or [1.0] * 3
    ref = scale * sum(wi * np64(t) for wi, t in zip(w, ts))
    out = ops.task_arithmetic(ts, weights, scale=scale)
    close(out, ref)
    close(out, scale * pm.task_arithmetic(ts, torch.tensor(w)))


# --------------------------------------------------------------------------------------------------
# magnitude masks and magnitude_prune
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.01, 0.1, 0.25, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("with_ties", [False, True])
def test_magnitude_mask_matches_reference(density, with_ties):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=g)
    if with_ties:  # many equal magnitudes with mixed signs
        x = torch.randint(-3, 4, (6, 9), generator=g).float()
    mask = ops.magnitude_mask(x, density)
    k = ref_k(density, x.numel())
    assert int(mask.sum()) == k
    np.testing.assert_array_equal(mask.numpy(), ref_topk_mask(x.numpy(), k))


def test_magnitude_mask_counts():
    x = torch.arange(1.0, 11.0)
    assert int(ops.magnitude_mask(x, 0.25).sum()) == 3  # 2.5 rounds half up
    assert int(ops.magnitude_mask(x, 0.01).sum()) == 1  # at least one entry
    assert bool(ops.magnitude_mask(x, 1.0).all())  # density 1 removes nothing
    assert ops.magnitude_mask(x, 0.3).tolist() == [False] * 7 + [True] * 3


@pytest.mark.parametrize("k", [1, 2, 17, 30, 53, 54])
def test_topk_paths_agree(k):
    """The CUDA path (topk on the smaller side) and the CPU path (kthvalue) select the same entries."""
    from llm_merging.ops.masks import topk_flat

    a = torch.randint(0, 6, (54,), generator=torch.Generator().manual_seed(44)).float()
    m_cpu, m_topk = topk_flat(a, k, use_topk=False), topk_flat(a, k, use_topk=True)
    assert torch.equal(m_cpu, m_topk) and int(m_cpu.sum()) == k
    np.testing.assert_array_equal(m_cpu.numpy(), ref_topk_mask(a.numpy(), k))


def test_public_api():
    for name in ops.__all__:
        assert callable(getattr(ops, name)), name


@pytest.mark.parametrize("weights", [None, [0.3, 1.2, 0.7]])
def test_magnitude_prune_matches_peft(weights):
    ts = rand_tvs(3, (4, 5), seed=4)  # 20 entries, density 0.4 -> 8 (integral: PEFT int() == round)
    w = weights or [1.0] * 3
    out = ops.magnitude_prune(ts, 0.4, weights, scale=0.5)
    close(out, 0.5 * pm.magnitude_prune(ts, torch.tensor(w), 0.4))
    ref = 0.5 * sum(wi * np64(t) * ref_topk_mask(np64(t), 8) for wi, t in zip(w, ts))
    close(out, ref)


def test_magnitude_prune_ties_consensus_is_ties():
    ts = rand_tvs(3, (4, 5), seed=5)
    close(
        ops.magnitude_prune(ts, 0.5, [1, 2, 3], consensus="ties"),
        ops.ties(ts, 0.5, [1, 2, 3]),
        atol=0,
        rtol=0,
    )


# --------------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weighted_sign", [False, True])
@pytest.mark.parametrize("divisor", ["count", "weight_sum", None])
@pytest.mark.parametrize("weights", [None, [0.7, 1.5, -0.4, 1.0]])
def test_ties_matches_loop_reference(sign_method, weighted_sign, divisor, weights):
    ts = rand_tvs(4, (5, 7), seed=6)
    w = weights or [1.0] * 4
    dens = [0.3, 0.5, 0.8, 1.0]
    out = ops.ties(ts, dens, weights, scale=0.8, sign_method=sign_method, weighted_sign=weighted_sign, divisor=divisor)
    ref = ref_ties(ts, dens, w, 0.8, sign_method=sign_method, weighted_sign=weighted_sign, divisor=divisor)
    close(out, ref)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0]])
def test_ties_matches_peft(sign_method, weights):
    ts = rand_tvs(3, (5, 8), seed=7)  # 40 entries * 0.2 = 8, integral
    out = ops.ties(ts, 0.2, weights, sign_method=sign_method)
    close(out, pm.ties(ts, torch.tensor(weights), 0.2, majority_sign_method=sign_method))


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_consensus_merge_matches_peft_primitives(sign_method):
    stacked = torch.stack(rand_tvs(4, (3, 5), seed=8))
    stacked[stacked.abs() < 0.5] = 0.0  # sparse, like trimmed vectors
    w = [0.5, 1.0, 2.0, 1.5]
    weighted = stacked * torch.tensor(w).view(-1, 1, 1)
    mask = pm.calculate_majority_sign_mask(stacked, method=sign_method)
    ref = pm.disjoint_merge(weighted, mask)
    close(ops.consensus_merge(stacked.clone(), w, sign_method=sign_method), ref)
    score = stacked.sum(0) if sign_method == "total" else stacked.sign().sum(0)
    close(ops.elect_sign(stacked, sign_method), np.where(np64(score) >= 0, 1.0, -1.0), atol=0, rtol=0)


def test_ties_identical_and_single_expert():
    t = rand_tvs(1, (4, 4), seed=9)[0]
    close(ops.ties([t, t.clone(), t.clone()], density=1.0), t, atol=1e-6)
    close(ops.ties([t], density=1.0), t, atol=0, rtol=0)
    # single expert, trimmed: its own top-k entries
    close(ops.ties([t], density=0.5), np64(t) * ref_topk_mask(np64(t), 8))


def test_ties_zero_sum_elects_plus():
    a = torch.tensor([1.0, -2.0])
    b = torch.tensor([-1.0, 2.0])
    # entry 0: sum 0 -> +1 elected -> only a agrees; entry 1: sum 0 -> +1 -> only b agrees
    close(ops.ties([a, b], density=1.0), [1.0, 2.0], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------------


def _our_dare_masks(ts, density, seed):
    dens = density if isinstance(density, (list, tuple)) else [density] * len(ts)
    return [
        ops.random_mask(t.shape, d, ops.derive_seed(seed, i), t.device) for i, (t, d) in enumerate(zip(ts, dens))
    ]


@pytest.mark.parametrize("consensus,peft_fn", [(None, pm.dare_linear), ("ties", pm.dare_ties)])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.4, 1.3, 0.9]])
def test_dare_matches_peft_with_same_masks(monkeypatch, consensus, peft_fn, weights):
    ts = rand_tvs(3, (6, 7), seed=10)
    density, seed = 0.4, 123
    masks = _our_dare_masks(ts, density, seed)
    out = ops.dare(ts, density, weights, consensus=consensus, seed=seed)
    feed = iter(masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: next(feed).to(p.dtype))
    ref = peft_fn(ts, torch.tensor(weights), density)
    close(out, ref)


@pytest.mark.parametrize("rescale", ["inverse", "l1", None])
@pytest.mark.parametrize("consensus", [None, "ties"])
def test_dare_matches_loop_reference(rescale, consensus):
    ts = rand_tvs(3, (5, 6), seed=11)
    dens, w, seed = [0.3, 0.6, 0.9], [1.0, 0.5, 2.0], 7
    masks = [np.asarray(m) for m in _our_dare_masks(ts, dens, seed)]
    pruned = []
    for t, m, d in zip(ts, masks, dens):
        x = np64(t)
        y = x * m
        if rescale == "inverse":
            y = y / d
        elif rescale == "l1":
            y = y * (np.abs(x).sum() / np.abs(y).sum())
        pruned.append(y)
    if consensus is None:
        ref = 0.7 * sum(wi * p for wi, p in zip(w, pruned))
    else:
        ref = 0.7 * ref_consensus(pruned, w)
    out = ops.dare(ts, dens, w, scale=0.7, consensus=consensus, rescale=rescale, seed=seed)
    close(out, ref)


def test_dare_seed_behaviour():
    ts = rand_tvs(2, (8, 8), seed=12)
    a = ops.dare(ts, 0.5, seed=1)
    assert torch.equal(a, ops.dare(ts, 0.5, seed=1))  # same seed -> bit-identical
    assert not torch.equal(a, ops.dare(ts, 0.5, seed=2))  # different seed -> different mask
    m1, m2 = ops.random_mask((8, 8), 0.5, 5), ops.random_mask((8, 8), 0.5, 6)
    assert not torch.equal(m1, m2)
    # distinct stream per model: identical inputs get different masks
    same = [ts[0], ts[0].clone()]
    masks = _our_dare_masks(same, 0.5, 3)
    assert not torch.equal(masks[0], masks[1])


def test_dare_distribution():
    mask = ops.random_mask((300, 300), 0.3, 0)
    frac = mask.float().mean().item()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 90000)
    # unbiased: E[dare_linear] = task arithmetic
    ts = rand_tvs(2, (3, 4), seed=13)
    mean = torch.stack([ops.dare(ts, 0.5, seed=s) for s in range(3000)]).mean(0)
    close(mean, ops.task_arithmetic(ts), atol=0.15, rtol=0)


def test_dare_density_one_is_task_arithmetic():
    ts = rand_tvs(3, (4, 5), seed=14)
    close(ops.dare(ts, 1.0, [1, 2, 3], scale=0.5), ops.task_arithmetic(ts, [1, 2, 3], 0.5), atol=1e-7, rtol=1e-6)  # same math, different summation order


# --------------------------------------------------------------------------------------------------
# Breadcrumbs
# --------------------------------------------------------------------------------------------------


def ref_breadcrumbs_mask(x, density, gamma):
    flat = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    n = flat.size
    if density >= 1:
        return np.ones(np.shape(x), dtype=bool)
    n_keep = ref_k(density, n)
    n_top = min(int(math.floor(gamma * n + 0.5)), n - n_keep)
    n_bot = n - n_keep - n_top
    asc = sorted(range(n), key=lambda j: (flat[j], -j))  # ascending; among ties higher index = "smaller"
    mask = np.zeros(n, dtype=bool)
    mask[asc[n_bot : n - n_top]] = True
    return mask.reshape(np.shape(x))


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.7, 0.2), (0.95, 0.1), (1.0, 0.05)])
@pytest.mark.parametrize("with_ties", [False, True])
def test_breadcrumbs_mask_matches_reference(density, gamma, with_ties):
    g = torch.Generator().manual_seed(15)
    x = torch.randint(-4, 5, (10, 10), generator=g).float() if with_ties else torch.randn(10, 10, generator=g)
    mask = ops.breadcrumbs_mask(x, density, gamma)
    np.testing.assert_array_equal(mask.numpy(), ref_breadcrumbs_mask(x.numpy(), density, gamma))


def test_breadcrumbs_mask_drops_outliers_and_small():
    x = torch.arange(1.0, 101.0)
    mask = ops.breadcrumbs_mask(x, density=0.8, gamma=0.05)
    kept = x[mask]
    assert kept.numel() == 80 and kept.min() == 16 and kept.max() == 95


@pytest.mark.parametrize("consensus", [None, "ties"])
def test_breadcrumbs_matches_loop_reference(consensus):
    ts = rand_tvs(3, (6, 5), seed=16)
    w = [1.0, 0.6, 1.4]
    pruned = [np64(t) * ref_breadcrumbs_mask(np64(t), 0.6, 0.1) for t in ts]
    ref = sum(wi * p for wi, p in zip(w, pruned)) if consensus is None else ref_consensus(pruned, w)
    close(ops.breadcrumbs(ts, 0.6, 0.1, w, consensus=consensus), ref)


# --------------------------------------------------------------------------------------------------
# DELLA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (4, 6), (3, 2, 4), (5, 1)])
def test_della_keep_probabilities_match_reference(shape):
    g = torch.Generator().manual_seed(17)
    x = torch.randint(-3, 4, shape, generator=g).float()  # with ties
    p = ops.della_keep_probabilities(x, 0.6, 0.2)
    close(p, ref_della_keep(x.numpy(), 0.6, 0.2), atol=1e-6)
    rows = ref_rows(p.numpy())
    if rows.shape[1] > 1:
        assert np.allclose(rows.min(1), 0.4) and np.allclose(rows.max(1), 0.8)


@pytest.mark.parametrize("consensus", ["ties", None])
@pytest.mark.parametrize("rescale", ["inverse", "l1", None])
def test_della_matches_loop_reference(consensus, rescale):
    ts = rand_tvs(3, (4, 6), seed=18)
    dens, eps, w, seed = [0.5, 0.7, 0.4], [0.1, 0.2, 0.3], [1.0, 2.0, 0.5], 99
    pruned = []
    for i, (t, d, e) in enumerate(zip(ts, dens, eps)):
        x = np64(t)
        keep = ref_della_keep(x, d, e)
        m = ops.della_mask(t, d, e, ops.derive_seed(seed, i))[0].numpy()
        y = x * m
        if rescale == "inverse":
            y = np.where(m, x / keep, 0.0)
        elif rescale == "l1":
            y = y * (np.abs(x).sum() / np.abs(y).sum())
        pruned.append(y)
    ref = sum(wi * p for wi, p in zip(w, pruned)) if consensus is None else ref_consensus(pruned, w)
    out = ops.della(ts, dens, eps, w, scale=1.0, consensus=consensus, seed=seed, rescale=rescale)
    close(out, ref, atol=1e-5)


def test_della_statistics_and_seed():
    x = torch.randn(200, 300, generator=torch.Generator().manual_seed(19))
    mask, keep = ops.della_mask(x, 0.7, 0.1, seed=4)
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    big = x.abs() > x.abs().median(dim=1, keepdim=True).values
    assert mask[big].float().mean() > mask[~big].float().mean()  # larger magnitude kept more often
    m2, _ = ops.della_mask(x, 0.7, 0.1, seed=4)
    m3, _ = ops.della_mask(x, 0.7, 0.1, seed=5)
    assert torch.equal(mask, m2) and not torch.equal(mask, m3)
    ts = rand_tvs(2, (3, 4), seed=20)  # unbiased with 1/(1-p_i) rescale
    mean = torch.stack([ops.della(ts, 0.6, 0.2, consensus=None, seed=s) for s in range(3000)]).mean(0)
    close(mean, ops.task_arithmetic(ts), atol=0.15, rtol=0)


def test_della_density_one_and_identical():
    ts = rand_tvs(3, (4, 5), seed=21)
    close(ops.della(ts, 1.0, 0.1, consensus=None), ops.task_arithmetic(ts), atol=0, rtol=0)
    t = ts[0]
    close(ops.della([t, t.clone()], 1.0, 0.0), t, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------------------------------


def ref_slerp(a, b, t, thr=0.9995):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= 1e-8 or nb <= 1e-8:
        return (1 - t) * a + t * b
    dot = float(np.clip(a @ b / (na * nb), -1, 1))
    if abs(dot) > thr:
        return (1 - t) * a + t * b
    th = math.acos(dot)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_slerp_matches_reference(t):
    a, b = rand_tvs(2, (5, 7), seed=22)
    out = ops.slerp(a, b, t)
    close(out, ref_slerp(a.numpy(), b.numpy(), t).reshape(5, 7))
    if t == 0.0:
        assert torch.equal(out, a)
    if t == 1.0:
        assert torch.equal(out, b)


def test_slerp_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.25, 0.5):
        close(ops.slerp(a, b, t), [math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)], atol=1e-6)


@pytest.mark.parametrize("case", ["identical", "parallel", "antiparallel", "zero_a", "zero_both"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_degenerate_never_nan(case, t):
    a = rand_tvs(1, (4, 3), seed=23)[0]
    b = {
        "identical": a.clone(),
        "parallel": 2.5 * a,
        "antiparallel": -a,
        "zero_a": a,
        "zero_both": torch.zeros_like(a),
    }[case]
    if case.startswith("zero"):
        a = torch.zeros_like(a)
    out = ops.slerp(a, b, t)
    assert torch.isfinite(out).all()
    close(out, (1 - t) * np64(a) + t * np64(b), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Model Stock
# --------------------------------------------------------------------------------------------------


def ref_model_stock(tvs):
    x = [np64(t).ravel() for t in tvs]
    n = len(x)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            den = np.linalg.norm(x[i]) * np.linalg.norm(x[j])
            cos.append(0.0 if den == 0 else np.clip(x[i] @ x[j] / den, -1, 1))
    c = min(1.0, max(0.0, float(np.mean(cos))))
    t = n * c / (1 + (n - 1) * c)
    return t * np.mean(x, axis=0).reshape(tvs[0].shape)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_reference(n):
    base = rand_tvs(1, (6, 4), seed=24)[0]
    ts = [base + 0.8 * t for t in rand_tvs(n, (6, 4), seed=25)]  # positively correlated
    close(ops.model_stock(ts), ref_model_stock(ts))


def test_model_stock_filter_wise():
    base = rand_tvs(1, (3, 5), seed=26)[0]
    ts = [base + t for t in rand_tvs(3, (3, 5), seed=27)]
    out = ops.model_stock(ts, filter_wise=True)
    for r in range(3):
        close(out[r], ref_model_stock([t[r] for t in ts]), atol=1e-5)


def test_model_stock_invariants():
    t = rand_tvs(1, (4, 4), seed=28)[0]
    close(ops.model_stock([t, t.clone(), t.clone()]), t, atol=1e-6)  # cos 1 -> t = 1
    z = torch.zeros(4, 4)
    for fw in (False, True):
        out = ops.model_stock([z, z.clone()], filter_wise=fw)
        assert torch.equal(out, z)
        out = ops.model_stock([t, -t], filter_wise=fw)  # negative cosine clamped -> t = 0
        assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0
    with pytest.raises(ConfigError, match="task_vectors"):
        ops.model_stock([t])


# --------------------------------------------------------------------------------------------------
# Geometric median
# --------------------------------------------------------------------------------------------------


def ref_weiszfeld(points, weights, iters=20000):
    x = np.stack([np.asarray(p, dtype=np.float64).ravel() for p in points])
    w = np.asarray(weights, dtype=np.float64)
    z = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(x - z, axis=1), 1e-15)
        z_new = ((w / d)[:, None] * x).sum(0) / (w / d).sum()
        if np.linalg.norm(z_new - z) < 1e-14:
            break
        z = z_new
    return z


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5, 1.5, 1.0]])
def test_geometric_median_matches_reference(weights):
    ts = rand_tvs(5, (3, 4), seed=29)
    w = weights or [1.0] * 5
    out = ops.geometric_median(ts, weights, eps=1e-9, max_iter=1000)
    close(out.ravel(), ref_weiszfeld(ts, w), atol=1e-4)
    # first-order optimality: sum of weighted unit vectors vanishes
    z = np64(out).ravel()
    g = sum(wi * (z - np64(t).ravel()) / np.linalg.norm(z - np64(t).ravel()) for wi, t in zip(w, ts))
    assert np.linalg.norm(g) < 1e-3 * sum(w)


def test_geometric_median_vertex_cases():
    d = rand_tvs(1, (6,), seed=30)[0]
    pts = [0.0 * d, 1.0 * d, 10.0 * d]  # collinear: the median is the middle point, a data point
    out = ops.geometric_median(pts)
    assert torch.isfinite(out).all()
    close(out, pts[1], atol=1e-5)
    ts = rand_tvs(3, (6,), seed=31)  # a dominant weight makes that point the median
    out = ops.geometric_median(ts, [5.0, 1.0, 1.0])
    assert torch.equal(out, ts[0])
    t = ts[0]
    assert torch.equal(ops.geometric_median([t, t.clone(), t.clone()]), t)
    assert torch.equal(ops.geometric_median([t]), t)


def test_geometric_median_translation_equivariant():
    ts = rand_tvs(4, (2, 3), seed=32)
    shift = torch.full((2, 3), 3.0)
    a = ops.geometric_median(ts, eps=1e-9, max_iter=500)
    b = ops.geometric_median([t + shift for t in ts], eps=1e-9, max_iter=500)
    close(b - shift, a, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# TSV, Iso-C, Iso-CTS (references follow the papers' code: zero-padded concatenation buffers)
# --------------------------------------------------------------------------------------------------


def ref_tsv(tvs):
    mats = [np64(t) for t in tvs]
    if mats[0].ndim != 2:
        return np.mean(mats, axis=0)
    T = len(mats)
    u0, s0, v0 = np.linalg.svd(mats[0], full_matrices=False)
    sum_u, sum_s, sum_v = np.zeros_like(u0), np.zeros_like(s0), np.zeros_like(v0)
    k = int(s0.shape[0] * (1 / T))
    for i, m in enumerate(mats):
        u, s, v = np.linalg.svd(m, full_matrices=False)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_v[i * k : (i + 1) * k, :] = v[:k, :]
    return ref_polar(sum_u) @ np.diag(sum_s) @ ref_polar(sum_v)


@pytest.mark.parametrize("shape,n", [((7, 9), 2), ((8, 6), 3), ((6, 6), 1), ((5,), 3)])
def test_tsv_matches_reference(shape, n):
    ts = rand_tvs(n, shape, seed=33)
    close(ops.tsv(ts, scale=1.0), ref_tsv(ts), atol=1e-4)
    close(ops.tsv(ts, scale=0.5), 0.5 * ref_tsv(ts), atol=1e-4)


def test_tsv_single_task_is_identity():
    t = rand_tvs(1, (6, 8), seed=34)[0]
    close(ops.tsv([t]), t, atol=1e-5)


def ref_iso_c(tvs):
    mats = [np64(t) for t in tvs]
    if mats[0].ndim != 2:
        return np.mean(mats, axis=0)
    u, s, vh = np.linalg.svd(sum(mats), full_matrices=False)
    return s.mean() * u @ vh


def ref_iso_cts(tvs, frac):
    mats = [np64(t) for t in tvs]
    if mats[0].ndim != 2:
        return np.mean(mats, axis=0)
    T, r = len(mats), min(mats[0].shape)
    k_c = int(r * frac)
    k_c = r - round((r - k_c) / T) * T
    u, s, vh = np.linalg.svd(sum(mats), full_matrices=False)
    uc, sc, vc = u[:, :k_c], s[:k_c], vh[:k_c]
    per = int((r - k_c) / T)
    cu, cs, cv = np.zeros_like(u), np.zeros_like(s), np.zeros_like(vh)
    for i, m in enumerate(mats):
        ut, st, vt = np.linalg.svd(m - uc @ uc.T @ m, full_matrices=False)
        cu[:, i * per : (i + 1) * per] = ut[:, :per]
        cs[i * per : (i + 1) * per] = st[:per]
        cv[i * per : (i + 1) * per] = vt[:per]
    cu[:, T * per : T * per + k_c], cs[T * per : T * per + k_c], cv[T * per : T * per + k_c] = uc, sc, vc
    return cs.mean() * ref_polar(cu) @ ref_polar(cv)


@pytest.mark.parametrize("shape,n", [((6, 9), 3), ((9, 5), 2), ((4,), 3), ((5, 5), 1)])
def test_iso_c_matches_reference(shape, n):
    ts = rand_tvs(n, shape, seed=35)
    close(ops.iso_c(ts, scale=0.7), 0.7 * ref_iso_c(ts), atol=1e-5)


@pytest.mark.parametrize("shape,n,frac", [((12, 10), 3, 0.8), ((10, 14), 2, 0.5), ((9, 9), 4, 0.0), ((6,), 2, 0.8)])
def test_iso_cts_matches_reference(shape, n, frac):
    ts = rand_tvs(n, shape, seed=36)
    close(ops.iso_cts(ts, frac, scale=1.3), 1.3 * ref_iso_cts(ts, frac), atol=1e-4)


def test_iso_cts_full_common_space_is_iso_c():
    ts = rand_tvs(3, (8, 6), seed=37)
    close(ops.iso_cts(ts, 1.0), ops.iso_c(ts), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# KnOTS
# --------------------------------------------------------------------------------------------------


def rand_lora(ranks, out_dim=6, in_dim=5, seed=38):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(out_dim, r, generator=g), torch.randn(r, in_dim, generator=g)) for r in ranks]


def ref_knots(factors, method, density, weights, scale, rtol=1e-5):
    """Dense reference as the KnOTS code: SVD of [ΔW₁ … ΔWₙ], split Vᵀ, merge ΣVᵢᵀ blocks, U @ merged."""
    dws = [np64(b) @ np64(a) for b, a in factors]
    in_dim = dws[0].shape[1]
    u, s, vh = np.linalg.svd(np.concatenate(dws, axis=1), full_matrices=False)
    keep = s > rtol * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = [np.diag(s) @ vh[:, i * in_dim : (i + 1) * in_dim] for i in range(len(dws))]
    if method == "task_arithmetic":
        merged = sum(w * b for w, b in zip(weights, blocks))
    else:
        trimmed = [b * ref_topk_mask(b, ref_k(density, b.size)) for b in blocks]
        merged = ref_consensus(trimmed, weights)
    return scale * u @ merged


@pytest.mark.parametrize("ranks", [[2, 3], [1, 2, 4], [3]])
@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_knots_matches_dense_reference(ranks, method):
    f = rand_lora(ranks)
    w = [1.0, 0.5, 1.5][: len(ranks)]
    out = ops.knots(f, method=method, density=0.4, weights=w, scale=0.6)
    close(out, ref_knots(f, method, 0.4, w, 0.6), atol=1e-4)


def test_knots_task_arithmetic_is_exact_and_lowrank_shapes():
    f = rand_lora([2, 5, 3], out_dim=7, in_dim=4)  # total rank 10 > out_dim
    w = [0.3, 1.0, -0.7]
    close(ops.knots(f, "task_arithmetic", weights=w), sum(wi * np64(b) @ np64(a) for wi, (b, a) in zip(w, f)), atol=1e-4)
    close(ops.knots(f[:1], "ties", density=1.0), np64(f[0][0]) @ np64(f[0][1]), atol=1e-4)
    close(ops.knots(f, "dare_linear", density=1.0), ops.knots(f, "task_arithmetic"), atol=1e-5)
    z = [(torch.zeros(7, 2), torch.randn(2, 4)), (torch.zeros(7, 3), torch.randn(3, 4))]
    out = ops.knots(z)
    assert out.shape == (7, 4) and torch.equal(out, torch.zeros(7, 4))


def test_knots_dare_seeded():
    f = rand_lora([2, 3])
    a = ops.knots(f, "dare_ties", density=0.5, seed=1)
    assert torch.equal(a, ops.knots(f, "dare_ties", density=0.5, seed=1))
    assert not torch.equal(a, ops.knots(f, "dare_ties", density=0.5, seed=2))


# --------------------------------------------------------------------------------------------------
# cross-cutting invariants
# --------------------------------------------------------------------------------------------------

ALL_TV_FUNCS = {
    "linear": lambda ts: ops.linear(ts),
    "task_arithmetic": lambda ts: ops.task_arithmetic(ts),
    "magnitude_prune": lambda ts: ops.magnitude_prune(ts, 0.5),
    "ties": lambda ts: ops.ties(ts, 0.5),
    "ties_ws": lambda ts: ops.ties(ts, 0.5, weighted_sign=True, divisor="weight_sum"),
    "dare_linear": lambda ts: ops.dare(ts, 0.5, seed=0),
    "dare_ties_l1": lambda ts: ops.dare(ts, 0.5, consensus="ties", rescale="l1", seed=0),
    "breadcrumbs": lambda ts: ops.breadcrumbs(ts, 0.8, 0.1, consensus="ties"),
    "della": lambda ts: ops.della(ts, 0.6, 0.2),
    "della_linear": lambda ts: ops.della(ts, 0.6, 0.2, consensus=None, rescale="l1"),
    "model_stock": lambda ts: ops.model_stock(ts),
    "model_stock_fw": lambda ts: ops.model_stock(ts, filter_wise=True),
    "geometric_median": lambda ts: ops.geometric_median(ts),
    "tsv": lambda ts: ops.tsv(ts),
    "iso_c": lambda ts: ops.iso_c(ts),
    "iso_cts": lambda ts: ops.iso_cts(ts),
    "slerp": lambda ts: ops.slerp(ts[0], ts[1], 0.4),
}


@pytest.mark.parametrize("name", sorted(ALL_TV_FUNCS))
@pytest.mark.parametrize("shape", [(5, 7), (9,)])
def test_zero_task_vectors_give_zeros(name, shape):
    ts = [torch.zeros(shape) for _ in range(3)]
    out = ALL_TV_FUNCS[name](ts)
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and float(out.abs().max()) == 0.0


@pytest.mark.parametrize("name", sorted(ALL_TV_FUNCS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inputs_untouched_and_float32_out(name, dtype):
    ts = rand_tvs(3, (6, 5), seed=40, dtype=dtype)
    before = [t.clone() for t in ts]
    out = ALL_TV_FUNCS[name](ts)
    assert out.dtype == torch.float32 and out.shape == (6, 5) and torch.isfinite(out).all()
    assert all(torch.equal(a, b) and a.dtype == dtype for a, b in zip(ts, before))


def test_knots_inputs_untouched():
    f = rand_lora([2, 3])
    before = [(b.clone(), a.clone()) for b, a in f]
    ops.knots(f, "ties", density=0.3)
    assert all(torch.equal(b, b0) and torch.equal(a, a0) for (b, a), (b0, a0) in zip(f, before))


@pytest.mark.parametrize(
    "name",
    ["linear", "ties", "breadcrumbs_d1", "della_d1", "model_stock", "geometric_median", "magnitude_prune_d1"],
)
def test_identical_experts_give_that_expert(name):
    t = rand_tvs(1, (5, 7), seed=41)[0]
    ts = [t, t.clone(), t.clone()]
    fn = {
        "linear": lambda: ops.linear(ts),
        "ties": lambda: ops.ties(ts, 1.0),
        "breadcrumbs_d1": lambda: ops.breadcrumbs(ts, 1.0, 0.01, consensus="ties"),
        "della_d1": lambda: ops.della(ts, 1.0, 0.1),
        "model_stock": lambda: ops.model_stock(ts),
        "geometric_median": lambda: ops.geometric_median(ts),
        "magnitude_prune_d1": lambda: ops.magnitude_prune(ts, 1.0, consensus="ties"),
    }[name]
    close(fn(), t, atol=1e-6)


def test_single_expert():
    t = rand_tvs(1, (4, 6), seed=42)[0]
    close(ops.linear([t]), t, atol=0, rtol=0)
    close(ops.task_arithmetic([t], scale=0.5), 0.5 * np64(t))
    close(ops.ties([t], 1.0), t, atol=0, rtol=0)
    close(ops.dare([t], 1.0, consensus="ties"), t, atol=0, rtol=0)
    close(ops.iso_c([t]), ref_iso_c([t]), atol=1e-5)
    close(ops.geometric_median([t]), t, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# ConfigError cases
# --------------------------------------------------------------------------------------------------

_T = rand_tvs(2, (3, 4), seed=43)
_BAD = [
    ("empty list", lambda: ops.task_arithmetic([]), "task_vectors"),
    ("single tensor", lambda: ops.linear(_T[0]), "tensors"),
    ("shape mismatch", lambda: ops.ties([_T[0], torch.zeros(4, 3)], 0.5), "shape"),
    ("density 0", lambda: ops.ties(_T, 0.0), "density"),
    ("density > 1", lambda: ops.dare(_T, 1.5), "density"),
    ("density negative", lambda: ops.magnitude_prune(_T, -0.1), "density"),
    ("density wrong length", lambda: ops.ties(_T, [0.5, 0.5, 0.5]), "density"),
    ("density nan", lambda: ops.ties(_T, float("nan")), "density"),
    ("weights wrong length", lambda: ops.task_arithmetic(_T, [1.0]), "weights"),
    ("weights zero sum", lambda: ops.linear(_T, [1.0, -1.0]), "weights"),
    ("bad sign method", lambda: ops.ties(_T, 0.5, sign_method="max"), "sign_method"),
    ("bad divisor", lambda: ops.ties(_T, 0.5, divisor="mean"), "divisor"),
    ("bad consensus", lambda: ops.dare(_T, 0.5, consensus="sum"), "consensus"),
    ("bad rescale", lambda: ops.dare(_T, 0.5, rescale="l2"), "rescale"),
    ("bad seed", lambda: ops.dare(_T, 0.5, seed=1.5), "seed"),
    ("gamma 1", lambda: ops.breadcrumbs(_T, 0.5, 1.0), "gamma"),
    ("epsilon too big", lambda: ops.della(_T, 0.7, 0.4), "epsilon"),
    ("epsilon below 0", lambda: ops.della(_T, 0.2, 0.3), "epsilon"),
    ("epsilon negative", lambda: ops.della(_T, 0.5, -0.1), "epsilon"),
    ("epsilon per model", lambda: ops.della(_T, 0.5, [0.1, 0.6]), "epsilon"),
    ("slerp t > 1", lambda: ops.slerp(_T[0], _T[1], 1.5), "t"),
    ("slerp t < 0", lambda: ops.slerp(_T[0], _T[1], -0.1), "t"),
    ("slerp shape", lambda: ops.slerp(_T[0], torch.zeros(2), 0.5), "shape"),
    ("model stock one", lambda: ops.model_stock(_T[:1]), "task_vectors"),
    ("geomedian negative weight", lambda: ops.geometric_median(_T, [1.0, -1.0]), "weights"),
    ("iso_cts fraction", lambda: ops.iso_cts(_T, 1.2), "common_space_fraction"),
    ("tsv rank", lambda: ops.tsv(_T, rank_per_task=0), "rank_per_task"),
    ("scale inf", lambda: ops.task_arithmetic(_T, scale=float("inf")), "scale"),
    ("knots empty", lambda: ops.knots([]), "lora_factors"),
    ("knots rank mismatch", lambda: ops.knots([(torch.zeros(4, 2), torch.zeros(3, 5))]), "lora_factors"),
    (
        "knots shape mismatch",
        lambda: ops.knots([(torch.zeros(4, 2), torch.zeros(2, 5)), (torch.zeros(3, 2), torch.zeros(2, 5))]),
        "lora_factors",
    ),
    ("knots method", lambda: ops.knots([(torch.zeros(4, 2), torch.zeros(2, 5))], method="slerp"), "method"),
]


@pytest.mark.parametrize("case,call,param", _BAD, ids=[c[0] for c in _BAD])
def test_config_errors(case, call, param):
    with pytest.raises(ConfigError) as info:
        call()
    msg = str(info.value)
    assert param in msg and "\n" not in msg


# ---------------------------------------------------------------------- low_rank (adapter SVD)
@pytest.mark.parametrize("method", ["full", "randomized"])
def test_low_rank_is_exact_for_a_low_rank_matrix(method):
    g = torch.Generator().manual_seed(0)
    mat = torch.randn(300, 8, generator=g) @ torch.randn(8, 400, generator=g)
    b, a, err = ops.low_rank(mat, 8, method=method)
    assert b.shape == (300, 8) and a.shape == (8, 400)
    assert err < 1e-5 and torch.allclose(b @ a, mat, atol=1e-4)


def test_low_rank_error_is_measured_and_near_optimal():
    g = torch.Generator().manual_seed(1)
    mat = torch.randn(512, 512, generator=g)
    s = np.linalg.svd(np64(mat), compute_uv=False)
    optimal = float(np.sqrt((s[16:] ** 2).sum() / (s ** 2).sum()))
    _, _, e_full = ops.low_rank(mat, 16, method="full")
    b, a, e_rand = ops.low_rank(mat, 16, method="randomized")
    assert e_full == pytest.approx(optimal, rel=1e-4)
    assert e_rand == pytest.approx(float(torch.linalg.matrix_norm(mat - b @ a) / torch.linalg.matrix_norm(mat)), rel=1e-5)
    assert optimal <= e_rand <= optimal * 1.02
    b2, a2, _ = ops.low_rank(mat, 16, method="randomized")
    assert torch.equal(b, b2) and torch.equal(a, a2)  # seeded: reproducible


def test_low_rank_auto_and_zero():
    assert ops.low_rank(torch.zeros(10, 20), 3)[2] == 0.0
    with pytest.raises(ConfigError, match="method"):
        ops.low_rank(torch.ones(4, 4), 2, method="lanczos")
