"""Fisher merging and AdaMerging: the math in ops against independent computations."""
import math

import pytest
import torch

from llm_merging import ops
from llm_merging.errors import ConfigError


# ------------------------------------------------------------------------------------------- fisher ops
def test_fisher_merge_closed_form_per_coordinate():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(5, 4, generator=g) for _ in range(3)]
    fishers = [torch.rand(5, 4, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0  # below the floor
    weights, eps = [0.5, 1.0, 2.0], 1e-3
    got = ops.fisher_merge(taus, fishers, weights=weights, eps=eps)
    for r in range(5):
        for c in range(4):
            f = [max(float(fishers[i][r, c]), eps) * weights[i] for i in range(3)]
            want = sum(fi * float(taus[i][r, c]) for i, fi in enumerate(f)) / sum(f)
            assert math.isclose(float(got[r, c]), want, rel_tol=1e-5, abs_tol=1e-6)
    # θ-space form of the paper: Σ wF θ / Σ wF, with θᵢ = θ₀ + τᵢ
    theta0 = torch.randn(5, 4, generator=g)
    fl = [f.clamp(min=eps) * w for f, w in zip(fishers, weights)]
    theta = sum(f * (theta0 + t) for f, t in zip(fl, taus)) / sum(fl)
    torch.testing.assert_close(theta0 + got, theta, rtol=1e-5, atol=1e-5)


def test_fisher_merge_identical_experts_and_floor():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(7, generator=g)
    fishers = [torch.rand(7, generator=g) for _ in range(3)]
    torch.testing.assert_close(ops.fisher_merge([tau, tau.clone(), tau.clone()], fishers), tau)
    zeros = [torch.zeros(7) for _ in range(2)]
    a, b = torch.randn(7, generator=g), torch.randn(7, generator=g)
    # every Fisher below ε: the plain mean; ε = 0 and no Fisher: the base (0)
    torch.testing.assert_close(ops.fisher_merge([a, b], zeros, eps=1e-6), (a + b) / 2)
    assert torch.equal(ops.fisher_merge([a, b], zeros, eps=0.0), torch.zeros(7))
    # one expert with Fisher far above the floor wins; a zero weight drops an expert
    big = [torch.full((7,), 1e3), torch.zeros(7)]
    torch.testing.assert_close(ops.fisher_merge([a, b], big, eps=1e-9), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.fisher_merge([a, b], big, weights=[0.0, 1.0], eps=1e-9), b)


def test_fisher_merge_bad_input():
    t = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(ConfigError, match="fishers"):
        ops.fisher_merge(t, [torch.zeros(3)])
    with pytest.raises(ConfigError, match="eps"):
        ops.fisher_merge(t, t, eps=-1.0)
    with pytest.raises(ConfigError, match="weights"):
        ops.fisher_merge(t, t, weights=[-1.0, 1.0])


def test_greedy_log_likelihood():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], requires_grad=True)
    lp = torch.log_softmax(logits.detach(), -1)
    want = float(lp[0, 0] + lp[1, 1])
    assert math.isclose(ops.greedy_log_likelihood(logits).item(), want, rel_tol=1e-6)
    mask = torch.tensor([False, True])
    assert math.isclose(ops.greedy_log_likelihood(logits, mask).item(), float(lp[1, 1]), rel_tol=1e-6)
    ops.greedy_log_likelihood(logits).backward()  # d/dz log softmax(z)_k = e_k − p
    p = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, torch.eye(3)[[0, 1]] - p)


def test_diagonal_fisher_is_the_mean_of_per_example_squared_gradients():
    """The loop against torch.func's vectorised per-example gradients of a toy language model."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Tanh(), torch.nn.Linear(6, 11))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    tokens = torch.randint(0, 11, (9, 5))

    def loss_of(p, x):
        return ops.greedy_log_likelihood(functional_call(model, p, (x,)))

    fisher, n = ops.diagonal_fisher(lambda x: loss_of(params, x), list(tokens), params)
    assert n == 9
    per_example = vmap(grad(loss_of), in_dims=(None, 0))({k: v.detach() for k, v in params.items()}, tokens)
    for name, g in per_example.items():
        torch.testing.assert_close(fisher[name], (g ** 2).mean(0), rtol=1e-5, atol=1e-7)
    # per-batch gradients give a different (smaller) estimate: the two are not interchangeable
    full = torch.autograd.grad(sum(loss_of(params, x) for x in tokens) / 9, params["2.weight"])[0]
    assert not torch.allclose(full ** 2, fisher["2.weight"])


# --------------------------------------------------------------------------------------- adamerging ops
def test_entropy_against_the_formula_and_masks():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ops.entropy(logits), -(p * p.log()).sum(-1))
    assert math.isclose(float(ops.entropy(logits)[1]), math.log(3), rel_tol=1e-6)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    q = torch.softmax(torch.tensor([1.0, 2.0]), -1)
    torch.testing.assert_close(ops.entropy(logits, mask), torch.stack([-(q * q.log()).sum(), torch.tensor(0.0)]))
    assert torch.isfinite(ops.entropy(torch.tensor([[1e4, -1e4]]))).all()


def test_task_vector_inner_dense_and_factors():
    g = torch.Generator().manual_seed(2)
    grad_, b, a = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    want = float((grad_.double() * (b @ a).double()).sum())
    assert math.isclose(ops.task_vector_inner(grad_, b @ a), want, rel_tol=1e-5)
    assert math.isclose(ops.task_vector_inner(grad_, factors=(b, a)), want, rel_tol=1e-5)
    with pytest.raises(ConfigError, match="do not fit"):
        ops.task_vector_inner(grad_, factors=(a, b))
    with pytest.raises(ConfigError, match="does not match"):
        ops.task_vector_inner(grad_, torch.zeros(5, 6))
