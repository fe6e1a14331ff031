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


# --------------------------------------------------------------------------- methods on the tiny models
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "A summary is", "Question: which one?",
           "According to the above context, choose the best option to answer the following question."]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _dirs(kind, n):
    from llm_merging import tiny

    return [str(tiny.lora_expert_dir("decoder", i) if kind == "lora" else tiny.full_expert_dir("decoder", i))
            for i in range(n)]


def _expert_models(kind, n):
    """The experts loaded on their own: PEFT's merge_and_unload for adapters, the checkpoint for full models."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_merging import tiny

    out = []
    for d in _dirs(kind, n):
        base = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder")))
        m = PeftModel.from_pretrained(base, d).merge_and_unload() if kind == "lora" else AutoModelForCausalLM.from_pretrained(d)
        out.append(m.eval())
    return out


def _merged(method_name, experts, prompts_file, values=None, **attrs):
    from llm_merging import tiny
    from llm_merging.runner import instantiate

    m = instantiate(method_name)
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.is_peft, m.device, m.progress = list(experts), None, "cpu", False
    m.calibration_files = [prompts_file]
    for k, v in attrs.items():
        setattr(m, k, v)
    m.set_hyperparameters(values or {})
    m.preflight()
    m.merge()
    return m


def _fisher_by_hand(model, prompts, positions="all"):
    """Per prompt, alone: backward of Σ_t log p(argmax_t), squared .grad, averaged (float64)."""
    from transformers import AutoTokenizer

    from llm_merging import tiny

    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    model.requires_grad_(True)
    for text in prompts:
        model.zero_grad()
        ids = torch.tensor([tok(text)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        picked = logp.max(-1).values
        (picked.sum() if positions == "all" else picked[-1]).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.double() ** 2
    return {n: a / len(prompts) for n, a in acc.items()}


@pytest.mark.parametrize("kind, positions", [("lora", "all"), ("full", "last")])
def test_fisher_merge_matches_fisher_computed_by_hand(tmp_path, kind, positions):
    from llm_merging import tiny
    from transformers import AutoModelForCausalLM

    n = 3 if kind == "lora" else 2
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    weights, eps = [1.0, 0.5, 2.0][:n], 1e-6
    m = _merged("fisher", _dirs(kind, n), prompts, {"weights": weights, "eps": eps, "positions": positions},
                fisher_memory=1 if kind == "full" else None)  # full: one parameter per chunk (one pass each)
    experts = _expert_models(kind, n)
    fishers = [_fisher_by_hand(e, PROMPTS, positions) for e in experts]
    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).named_parameters())
    got = dict(m.base_model.named_parameters())
    touched = set().union(*(e.param_names() for e in m.experts)) if m.experts else set()
    checked = 0
    for name, b in base.items():
        thetas = [dict(e.named_parameters())[name].detach().double() for e in experts]
        if all(torch.equal(t, b.detach().double()) for t in thetas):
            assert torch.equal(got[name], b), name  # no expert changes it: the base
            continue
        f = [fi[name].clamp(min=eps) * w for fi, w in zip(fishers, weights)]
        want = sum(fi * t for fi, t in zip(f, thetas)) / sum(f)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-4, atol=2e-5, msg=name)
        checked += 1
    assert checked >= (7 if kind == "lora" else 15)
    rep = m.calibration_report()
    assert rep["fisher"]["per_example_gradients"] and rep["fisher"]["prompts_per_expert"] == [len(PROMPTS)] * n
    assert rep["fisher"]["chunks"] == (len(touched) if kind == "full" else 1)
    assert rep["forward_passes"] == n * len(PROMPTS) * rep["fisher"]["chunks"]


def test_fisher_of_identical_experts_is_that_expert(tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = _write(tmp_path / "p.txt", PROMPTS[:2])
    d = _dirs("full", 1)[0]
    m = _merged("fisher", [d, d], prompts)
    want = dict(AutoModelForCausalLM.from_pretrained(d).named_parameters())
    for name, p in m.base_model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=1e-6, msg=name)
