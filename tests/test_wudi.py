"""WUDI merging (``ops.wudi`` and the ``wudi`` method): the loss and its gradient against a hand-written
computation in the reference code's conventions (``nathanielyvo/WUDI-Merging``, ``wudi_main.py``:
``Σ square((X − τᵢ) τᵢᵀ) / ‖τᵢ‖²`` summed, Adam from Σ τᵢ), the closed form, the Adam steps against the
reference's own loop, edge cases, and runs through the command line on the tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError
from llm_merging.main import main
from llm_merging.merging.Wudi import Wudi
from llm_merging.model import tiny


def rand_tvs(n=3, shape=(6, 9), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


def ref_loss_np(x, tvs):
    """The loss entry by entry in float64 NumPy loops: Σᵢ Σ_{r,s} ((X − τᵢ) τᵢᵀ)[r,s]² / Σ τᵢ²."""
    x = np.asarray(x, dtype=np.float64)
    total = 0.0
    for t in tvs:
        t = np.asarray(t, dtype=np.float64)
        norm2 = sum(v * v for v in t.ravel())
        e = x - t
        for r in range(x.shape[0]):
            for s in range(x.shape[0]):
                total += sum(e[r, j] * t[s, j] for j in range(x.shape[1])) ** 2 / norm2
    return total


def ref_loss_autograd(x, tvs, dtype=torch.float64):
    """The reference's batched expression (stacked task vectors, matmul, summed), with its autograd gradient."""
    vectors = torch.stack(tvs).to(dtype)
    xx = x.detach().to(dtype).clone().requires_grad_(True)
    l2 = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    inner = torch.matmul(xx.unsqueeze(0) - vectors, vectors.transpose(1, 2))
    loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
    loss.backward()
    return float(loss.detach()), xx.grad


def ref_adam(tvs, steps, lr):
    """The reference's optimisation loop: a Parameter at Σ τᵢ, Adam(lr), the summed loss by autograd, float32."""
    vectors = torch.stack(tvs).float()
    merging = torch.nn.Parameter(vectors.sum(dim=0))
    opt = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    l2 = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(steps):
        inner = torch.matmul(merging.unsqueeze(0) - vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner) / l2.unsqueeze(-1).unsqueeze(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return merging.detach()


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("shape", [(4, 5), (5, 3)])
def test_loss_and_gradient_match_hand_computation(shape):
    tvs = rand_tvs(3, shape, seed=1)
    x = rand_tvs(1, shape, seed=2)[0]
    want, want_grad = ref_loss_autograd(x, tvs)
    assert ops.wudi_loss(x, tvs) == pytest.approx(ref_loss_np(x.numpy(), [t.numpy() for t in tvs]), rel=1e-9)
    assert ops.wudi_loss(x, tvs) == pytest.approx(want, rel=1e-9)
    # the gradient, by the hand formula 2 Σ (X − τᵢ) τᵢᵀ τᵢ / ‖τᵢ‖² and by autograd of the reference's expression
    hand = sum(2 * (x.double() - t.double()) @ t.double().T @ t.double() / t.double().square().sum() for t in tvs)
    assert torch.allclose(want_grad, hand, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ops.wudi_gradient(x, tvs).double(), hand, rtol=1e-5, atol=1e-5)


def test_zero_task_vectors_have_no_term():
    tvs = rand_tvs(2, (4, 6), seed=3)
    zero = torch.zeros(4, 6)
    x = rand_tvs(1, (4, 6), seed=4)[0]
    assert ops.wudi_loss(x, tvs + [zero]) == pytest.approx(ops.wudi_loss(x, tvs), rel=1e-12)
    assert torch.equal(ops.wudi(tvs + [zero], 5, 1e-3), ops.wudi(tvs, 5, 1e-3))
    assert torch.equal(ops.wudi([tvs[0], zero]), tvs[0])


# ------------------------------------------------------------------------------------------------ solvers
@pytest.mark.parametrize("shape", [(6, 9), (12, 5), (3, 40)])  # dense, tall, wide (stacked form)
def test_closed_form_minimises_the_loss(shape):
    tvs = rand_tvs(3, shape, seed=5)
    cf = ops.wudi(tvs, solver="closed_form")
    total = tvs[0] + tvs[1] + tvs[2]
    g0 = ops.wudi_gradient(total, tvs).norm()
    assert ops.wudi_gradient(cf, tvs).norm() < 1e-5 * g0
    best = ops.wudi_loss(cf, tvs)
    assert best < ops.wudi_loss(total, tvs)  # task arithmetic's loss
    assert best < ops.wudi_loss(total / 3, tvs)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        assert best <= ops.wudi_loss(cf + 1e-2 * torch.randn(shape, generator=g), tvs)
    # rows of Σ τᵢ outside the task vectors' row spaces never change: the correction lies in their span
    _, _, vh = torch.linalg.svd(torch.cat(tvs).double())
    rank = torch.linalg.matrix_rank(torch.cat(tvs).double())
    null = vh[rank:]
    assert torch.allclose((cf.double() - total.double()) @ null.T, torch.zeros(shape[0], null.shape[0], dtype=torch.float64),
                          atol=1e-5)


def test_closed_form_solves_the_normal_equations():
    tvs = [t.double() for t in rand_tvs(3, (5, 8), seed=7)]
    a = [1 / t.square().sum() for t in tvs]
    lhs = sum(ai * t.T @ t for ai, t in zip(a, tvs))
    rhs = sum(ai * t @ t.T @ t for ai, t in zip(a, tvs))
    cf = ops.wudi([t.float() for t in tvs], solver="closed_form").double()
    assert torch.allclose(cf @ lhs, rhs, rtol=1e-4, atol=1e-5)


def test_adam_converges_to_the_closed_form():
    tvs = rand_tvs(3, (6, 9), seed=8)
    cf = ops.wudi(tvs, solver="closed_form")
    losses = [ops.wudi_loss(ops.wudi(tvs, steps, 1e-2), tvs) for steps in (0, 100, 3000)]
    assert losses[0] > losses[1] > losses[2]
    assert losses[2] == pytest.approx(ops.wudi_loss(cf, tvs), rel=1e-5)
    assert torch.allclose(ops.wudi(tvs, 3000, 1e-2), cf, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("lr, steps", [(1e-5, 300), (1e-2, 50)])
def test_adam_takes_the_reference_steps(lr, steps):
    tvs = rand_tvs(3, (8, 8), seed=9, scale=1e-2)
    ours = ops.wudi(tvs, steps, lr)
    ref = ref_adam(tvs, steps, lr)
    start = tvs[0] + tvs[1] + tvs[2]
    assert (ours - start).abs().max() > 0.1 * min(lr * steps, 1e-2)  # it moved ...
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))  # ... as the reference did


def test_defaults_are_the_reference():
    assert (ops.wudi.__kwdefaults__["solver"], ops.wudi.__defaults__) == ("adam", (300, 1e-5))
    h = Wudi().hparams
    assert (h["steps"], h["lr"], h["solver"], h["scale"]) == (300, 1e-5, "adam", 1.0)


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_lora_basis_gives_the_same_steps(solver):
    g = torch.Generator().manual_seed(10)
    factors = [(torch.randn(30, r, generator=g), torch.randn(r, 40, generator=g)) for r in (2, 3)]
    tvs = [b @ a for b, a in factors]
    basis = torch.cat([a.T for _, a in factors], dim=1)
    dense = ops.wudi(tvs, 40, 1e-2, solver=solver)
    low = ops.wudi(tvs, 40, 1e-2, solver=solver, row_basis=basis)
    assert torch.allclose(low, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))
    # a basis that does not span the rows is checked and not used
    assert torch.equal(ops.wudi(tvs, 40, 1e-2, solver=solver, row_basis=basis[:, :2]), dense)
    with pytest.raises(ConfigError, match="row_basis"):
        ops.wudi(tvs, 2, solver=solver, row_basis=basis[:5])


def test_deterministic():
    tvs = rand_tvs(3, (16, 12), seed=11)
    assert torch.equal(ops.wudi(tvs, 50, 1e-3), ops.wudi(tvs, 50, 1e-3))
    assert torch.equal(ops.wudi(tvs, solver="closed_form"), ops.wudi(tvs, solver="closed_form"))


# ------------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_one_expert_gives_its_task_vector(solver):
    t = rand_tvs(1, (7, 5), seed=12)[0]
    out = ops.wudi([t], solver=solver, scale=0.5)
    if solver == "adam":
        assert torch.equal(out, t * 0.5)  # the gradient is exactly 0 at τ: Adam does not move
    else:
        assert torch.allclose(out, t * 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["adam", "closed_form"])
def test_zero_task_vectors_give_zero(solver):
    out = ops.wudi([torch.zeros(4, 3), torch.zeros(4, 3)], solver=solver)
    assert torch.equal(out, torch.zeros(4, 3))
    assert ops.wudi_loss(out, [torch.zeros(4, 3)]) == 0.0


def test_steps_zero_is_the_sum():
    tvs = rand_tvs(3, (4, 4), seed=13)
    assert torch.allclose(ops.wudi(tvs, 0, scale=2.0), 2 * (tvs[0] + tvs[1] + tvs[2]))


def test_one_dimensional_tensors():
    tvs = rand_tvs(3, (7,), seed=14)
    with pytest.raises(ConfigError, match="matrices"):
        ops.wudi(tvs)
    assert torch.allclose(ops.wudi_fallback(tvs, "mean"), sum(tvs) / 3)
    assert torch.allclose(ops.wudi_fallback(tvs, "sum", scale=0.5), sum(tvs) * 0.5)
    assert torch.equal(ops.wudi_fallback(tvs, "base"), torch.zeros(7))
    method = Wudi()
    for how, want in (("mean", sum(tvs) / 3), ("base", torch.zeros(7))):
        method.hparams["fallback"] = how
        assert torch.allclose(method.merge_tensor("model.norm.weight", torch.zeros(7), tvs), want)


@pytest.mark.parametrize("kwargs, key", [({"solver": "sgd"}, "solver"), ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"),
                                         ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"scale": float("inf")}, "scale")])
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ops.wudi(rand_tvs(2, (3, 3)), **kwargs)


# ------------------------------------------------------------------------------------------------ the method
def test_method_on_matrices_and_fallback():
    tvs = rand_tvs(3, (6, 9), seed=15)
    method = Wudi()
    method.hparams.update(steps=20, lr=1e-3)
    assert torch.equal(method.merge_tensor("w", torch.zeros(6, 9), tvs), ops.wudi(tvs, 20, 1e-3))
    method.hparams["solver"] = "none"
    assert torch.allclose(method.merge_tensor("w", torch.zeros(6, 9), tvs), sum(tvs) / 3)


def test_conv1d_weights_are_transposed():
    from transformers.pytorch_utils import Conv1D

    model = torch.nn.Sequential(Conv1D(6, 9), torch.nn.Embedding(11, 9))  # Conv1D(nf=out, nx=in): weight (9, 6)
    method = Wudi()
    method.base_model = model
    method.hparams.update(steps=10, lr=1e-2)
    tvs = rand_tvs(2, (9, 6), seed=16)
    want = ops.wudi([t.T for t in tvs], 10, 1e-2).T
    assert torch.allclose(method.merge_tensor("0.weight", torch.zeros(9, 6), tvs), want)
    emb = rand_tvs(2, (11, 9), seed=17)
    assert torch.allclose(method.merge_tensor("1.weight", torch.zeros(11, 9), emb), (emb[0] + emb[1]) / 2)


def test_budget_is_checked_between_steps():
    method = Wudi()
    method.should_stop = lambda: True
    with pytest.raises(BudgetExceeded, match="wudi"):
        method.merge_tensor("w", torch.zeros(4, 4), rand_tvs(2, (4, 4)))
    method.hparams["steps"] = 5  # fewer steps than one budget check: nothing to stop
    method.merge_tensor("w", torch.zeros(4, 4), rand_tvs(2, (4, 4)))


# ------------------------------------------------------------------------------------------------ command line
def test_cli_tiny_run(capsys, tmp_path):
    code = main(["-m", "wudi", "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path)])
    assert code == 0, capsys.readouterr().err


def _weights(path):
    return {k: v.to(torch.float32) for k, v in load_file(str(next(path.glob("*.safetensors")))).items()}


def test_cli_full_experts_equal_the_op(capsys, tmp_path):
    base = tiny.base_dir("decoder")
    experts = [tiny.full_expert_dir("decoder", i) for i in range(3)]
    code = main(["-m", "wudi", "--base-model", str(base), "--models", *map(str, experts), "--output_folder",
                 str(tmp_path), "--no-eval", "--quiet", "--set", "steps=20", "lr=1e-3",
                 "solver=[{filter: lm_head, value: none}, {value: adam}]"])
    assert code == 0, capsys.readouterr().err
    merged = load_file(str(tmp_path / "wudi" / "merged_model" / "model.safetensors"))
    b, es = _weights(base), [_weights(e) for e in experts]
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        want = b[name] + ops.wudi([e[name] - b[name] for e in es], 20, 1e-3)
        assert torch.allclose(merged[name], want, rtol=1e-5, atol=1e-6), name
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):  # the fallback: mean
        want = b[name] + sum(e[name] - b[name] for e in es) / 3
        assert torch.allclose(merged[name], want, rtol=1e-5, atol=1e-6), name


def test_cli_lora_experts_equal_the_op(capsys, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny.base_dir("decoder")
    loras = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    code = main(["-m", "wudi", "--base-model", str(base), "--models", *map(str, loras), "--output_folder",
                 str(tmp_path), "--no-eval", "--quiet", "--set", "steps=30", "lr=1e-3"])
    assert code == 0, capsys.readouterr().err
    merged = load_file(str(tmp_path / "wudi" / "merged_model" / "model.safetensors"))
    b = _weights(base)
    tvs = []
    for lora in loras:  # PEFT's own merge gives each expert's weights
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(lora)).merge_and_unload()
        tvs.append({k: v.detach().float() - b[k] for k, v in model.state_dict().items() if k in b})
    changed = [k for k in b if any(bool(t[k].abs().max() > 0) for t in tvs)]
    assert changed
    for name in changed:
        want = b[name] + ops.wudi([t[name] for t in tvs], 30, 1e-3)
        assert torch.allclose(merged[name], want, rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("setting, key", [("steps=-1", "steps"), ("steps=1.5", "steps"), ("lr=0", "lr"),
                                          ("solver=sgd", "solver"), ("fallback=median", "fallback"), ("scale=-1", "scale")])
def test_bad_hyperparameters_are_one_line_errors(capsys, tmp_path, setting, key):
    code = main(["-m", "wudi", "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path),
                 "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0], err
