"""LiNeS (method ``lines`` and the ``lines=α,β`` post-pass of every engine method), CART (``cart``) and STAR
(``star``): each against an independent computation written after the authors' reference code.

References read (conventions reproduced by the hand-written ``ref_*`` functions below):

- LiNeS, Wang et al., ICLR 2025: ``wang-kee/LiNeS`` @ 04858ad, ``src/eval/eval.py`` ``LiNeS_scaling`` (paper
  Eq. 1, λ(l) = α + β·l/(L−1)): a key belongs to block l when it contains ``.{l}.`` (l = 0 … L−1, the first
  match wins); keys outside the blocks get α. Merging variant (``evaluate`` with ``apply_lines``):
  α = ‖Σ τ‖₁/‖τ_merged‖₁/T, which is 1/T for task arithmetic (``sum``), the multi-task vector is Σ τᵢ.
- CART, Choi et al. 2024 (arXiv:2412.12153): ``JH-GEECS/CART`` @ 37bb668, ``src/merging.py``
  ``_merge_weights("CART")`` / ``_get_truncated_task_vectors``: θ_avg = θ₀ + (1/T) Σ τᵢ, centred
  τ̄ᵢ = τᵢ + θ₀ − θ_avg, rank k = max(1, int(ratio·min(m, n))) (ratio 0: zeros, 1: whole; or the energy
  threshold), θ = θ_avg + prior · Σᵢ SVD_k(τ̄ᵢ); keys that are not attention/MLP matrices keep τ̄ᵢ whole.
- STAR, Lee et al., NAACL 2025: ``IBM/STAR`` @ 266f76e, ``merger/STAR.py`` ``star`` (Eqs. 2–4): kept rank
  r = searchsorted(cumsum σ, Σσ·η/100) + 1, kept σ scaled by Σσ / Σσ_kept, then ``weighted_merge`` with
  α = 1/T (a plain mean); η is a percentage.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.merging import settings
from llm_merging.merging.Cart import Cart
from llm_merging.merging.Lines import Lines
from llm_merging.merging.Star import Star
from llm_merging.merging.TaskArithmetic import TaskArithmetic
from llm_merging.merging.TiesMerge import TiesMerge
from llm_merging.merging.factory import instantiate
from llm_merging.merging.recipe import apply_recipe, load_recipe
from llm_merging.model import tiny
from llm_merging.ops import masks, streaming
from llm_merging.search.space import build_space

CUDA = torch.cuda.is_available()


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def f64(t):
    return t.detach().to(torch.float64).cpu()


# ------------------------------------------------------------------------------------------------------
# hand-written references (float64), following the authors' code
# ------------------------------------------------------------------------------------------------------
def ref_lines_scaling(vector: dict, alpha, beta, num_blocks):
    """``LiNeS_scaling`` of the reference: substring ``.{l}.`` picks the block; α outside."""
    key_blocks = [f".{i}." for i in range(num_blocks)]
    scales = {}
    for k in vector:
        for layer, block in enumerate(key_blocks):
            if block in k:
                scales[k] = alpha + beta * (layer / (num_blocks - 1))
                break
    return {k: v * scales.get(k, alpha) for k, v in vector.items()}


def ref_star_matrix(matrix, eta):
    """``merger/STAR.py`` ``star`` (full SVD branch), in float64."""
    u, s, vt = torch.linalg.svd(f64(matrix), full_matrices=False)
    sum_tot = torch.sum(s)
    cum = torch.cumsum(s, dim=0)
    rank_remain = torch.searchsorted(cum, (sum_tot * eta / 100).reshape(1))[0].item() + 1
    remain = s[:rank_remain]
    scaled = (sum_tot / torch.sum(remain)) * remain
    return u[:, :rank_remain] @ torch.diag_embed(scaled) @ vt[:rank_remain, :]


def ref_star_merge(tvs, eta):
    star_tvs = [ref_star_matrix(t, eta) for t in tvs]
    alphas = [1 / len(star_tvs)] * len(star_tvs)
    merged = star_tvs[0].clone() * alphas[0]
    for t, a in zip(star_tvs[1:], alphas[1:]):
        merged += t * a
    return merged


def ref_cart(theta0: dict, thetas: list[dict], ratio, prior, svd_keys, energy=False):
    """``_merge_weights("CART")`` of the reference on state dicts (float64)."""
    theta0 = {k: f64(v) for k, v in theta0.items()}
    tvs = [{k: f64(th[k]) - theta0[k] for k in theta0} for th in thetas]
    n = len(tvs)
    summed = {k: sum(tv[k] for tv in tvs) for k in theta0}
    theta_avg = {k: theta0[k] + (1.0 / n) * summed[k] for k in theta0}
    lowrank = {k: torch.zeros_like(v) for k, v in theta0.items()}
    for tv in tvs:
        for key, value in tv.items():
            val = value + theta0[key] - theta_avg[key]
            if key in svd_keys:
                u, s, vt = torch.linalg.svd(val, full_matrices=False)
                dim = s.shape[0]
                if ratio == 0.0:
                    u, s, vt = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vt)
                    k = 1
                elif ratio == 1.0:
                    k = dim
                elif energy:
                    e = s ** 2
                    k = (torch.cumsum(e, 0) / e.sum() >= ratio).nonzero(as_tuple=True)[0].min().item() + 1
                else:
                    k = max(1, int(ratio * dim))
                lowrank[key] += (u[:, :k] * s[:k]) @ vt[:k, :]
            else:
                lowrank[key] += torch.zeros_like(val) if ratio == 0.0 else val
    return {k: theta_avg[k] + prior * lowrank[k] for k in theta0}


# ------------------------------------------------------------------------------------------------------
# LiNeS
# ------------------------------------------------------------------------------------------------------
LLAMA_NAMES = (["model.embed_tokens.weight"]
               + [f"model.layers.{i}.{m}" for i in range(12)
                  for m in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")]
               + ["model.norm.weight", "lm_head.weight"])


def test_lines_factor_matches_reference_block_matching():
    """Our depth (settings.Layout) gives the reference's block of every Llama tensor, α outside the blocks."""
    layout = settings.Layout(LLAMA_NAMES)
    ones = {n: torch.ones((), dtype=torch.float64) for n in LLAMA_NAMES}
    want = ref_lines_scaling(ones, 0.3, 0.9, 12)
    for name in LLAMA_NAMES:
        got = ops.lines_scale(*(layout.depth(name) or (None, None)), 0.3, 0.9)
        assert got == pytest.approx(float(want[name]), abs=1e-12), name
    assert ops.lines_scale(None, None, 0.3, 0.9) == 0.3  # embeddings / norm / head
    assert ops.lines_scale(11, 12, 0.3, 0.9) == pytest.approx(1.2)  # the last block: α + β
    assert ops.lines_scale(0, 1, 0.3, 0.9) == 0.3  # one block: α (the reference divides by zero)


def test_lines_layout_depth_ignores_recipe_slices_and_stacks():
    names = [f"encoder.block.{i}.layer.{j}.w" for i in range(3) for j in range(2)] + \
            [f"decoder.block.{i}.layer.0.w" for i in range(5)] + ["shared.weight"]
    layout = settings.Layout(names)
    assert layout.depth("encoder.block.2.layer.1.w") == (2, 3)  # the block, not T5's sub-layer index
    assert layout.depth("decoder.block.4.layer.0.w") == (4, 5)
    assert layout.depth("shared.weight") is None
    sliced = settings.Layout([f"model.layers.{i}.w" for i in range(6)], [2, 4])
    assert sliced.depth("model.layers.3.w") == (3, 6)


def test_lines_op_and_errors():
    tv = rand((3, 4), 0)
    assert torch.equal(ops.lines(tv, 2, 5, 0.5, 1.0), tv * (0.5 + 1.0 * 2 / 4))
    assert torch.equal(ops.lines(tv, None, None, 0.25, 1.0), tv * 0.25)
    with pytest.raises(ConfigError, match="layer"):
        ops.lines_scale(5, 5, 0.5, 1.0)
    with pytest.raises(ConfigError, match="alpha"):
        ops.lines_scale(0, 5, float("nan"), 1.0)


def _method(cls, names, n_models, **hparams):
    m = cls()
    m.list_models = [f"m{i}" for i in range(n_models)]
    m.layout = settings.Layout(names)
    m.set_hyperparameters(hparams)
    return m


@pytest.mark.parametrize("n, alpha, beta", [(3, None, 0.5), (2, 0.2, 1.0), (1, None, 0.0)])
def test_lines_method_equals_reference_merging_variant(n, alpha, beta):
    """Σ τᵢ scaled by LiNeS_scaling(α = 1/T unless given, β), tensor by tensor."""
    names = LLAMA_NAMES
    tvs = {name: [rand((4, 6), 10 * i + k) for i in range(n)] for k, name in enumerate(names)}
    m = _method(Lines, names, n, beta=beta, **({} if alpha is None else {"alpha": alpha}))
    summed = {name: sum(f64(t) for t in ts) for name, ts in tvs.items()}
    want = ref_lines_scaling(summed, 1.0 / n if alpha is None else alpha, beta, 12)
    for name in names:
        got = m.merge_resolved(name, torch.zeros(4, 6), tvs[name])
        torch.testing.assert_close(f64(got), want[name], rtol=1e-6, atol=1e-6)


def test_lines_method_is_task_arithmetic_with_the_post_pass_on(monkeypatch):
    """``lines`` scales once: its merge_tensor is Σ wᵢτᵢ and the engine's post-pass (the one λ(l)) scales it, so it
    equals task_arithmetic with ``lines=1/T,β`` bit for bit, whole and in chunks; per-tensor α is resolved."""
    monkeypatch.setattr(streaming, "BLOCK", 256)
    names = LLAMA_NAMES
    lines = _method(Lines, names, 3, weights=[0.7, 0.3, 0.5], beta=0.8)
    ta = _method(TaskArithmetic, names, 3, weights=[0.7, 0.3, 0.5], lines=[1 / 3, 0.8])
    for k, name in enumerate(names):
        tvs = [rand((5, 7), 100 * k + i) for i in range(3)]
        got = lines.merge_resolved(name, torch.zeros(5, 7), tvs)
        assert torch.equal(got, ta.merge_resolved(name, torch.zeros(5, 7), tvs)), name
        assert torch.equal(lines.merge_tensor(name, torch.zeros(5, 7), tvs),  # unscaled: Σ wᵢτᵢ
                           ops.task_arithmetic(tvs, weights=[0.7, 0.3, 0.5]))
    name = "model.layers.7.mlp.down_proj.weight"
    tvs = [rand((40, 51), i) for i in range(3)]
    fb, ft = torch.zeros(40 * 51), [t.reshape(-1) for t in tvs]

    def read(s, e):
        return fb[s:e], [t[s:e] for t in ft]

    read.chunk = 512
    out = torch.empty(40 * 51)
    for s, e, merged in lines.merge_chunks_resolved(name, read, 40 * 51, 3):
        out[s:e] = merged
    assert torch.equal(out.view(40, 51), lines.merge_resolved(name, torch.zeros(40, 51), tvs))
    graded = Lines()
    graded.list_models = ["m0", "m1"]
    graded.layout = settings.Layout(names)
    graded.set_hyperparameters({"alpha": "{gradient: [0.1, 0.5]}", "beta": "1"}, from_text=True)
    alpha = graded.resolve_hparams(name, 2)["alpha"]
    assert 0.1 < alpha < 0.5
    torch.testing.assert_close(graded.merge_resolved(name, torch.zeros(40, 51), tvs[:2]),
                               (tvs[0] + tvs[1]) * (alpha + 7 / 11), rtol=1e-6, atol=1e-7)


def test_lines_method_refuses_the_lines_modifier():
    """``--set lines=`` on ``-m lines`` would scale a second time: refused, naming the key and what to set."""
    m = instantiate("lines")
    assert "lines" not in m.all_hyperparameters() and "lines" not in m.hparams
    with pytest.raises(ConfigError, match="'lines'.*alpha and beta"):
        m.set_hyperparameters({"lines": "0.5,1"}, from_text=True)
    with pytest.raises(ConfigError, match="'lines'"):
        m.set_hyperparameters({"lines": [0.5, 1.0]})


def test_lines_method_zero_task_vectors():
    names = LLAMA_NAMES
    m = _method(Lines, names, 2)
    got = m.merge_resolved("model.layers.3.mlp.down_proj.weight", torch.zeros(3), [torch.zeros(3)] * 2)
    assert torch.equal(got, torch.zeros(3))


@pytest.mark.parametrize("cls, hparams", [(TaskArithmetic, {"weights": [0.7, 0.3, 0.5]}),
                                          (TiesMerge, {"density": 0.4}),
                                          (Cart, {"rank_ratio": 0.5})])
def test_lines_modifier_in_process_equals_scaled_merge(cls, hparams):
    """merge_resolved with lines=α,β is the method's merge_resolved without it, times λ(l)."""
    names = LLAMA_NAMES
    plain = _method(cls, names, 3, **hparams)
    scaled = _method(cls, names, 3, lines="0.25,2", **hparams)
    for k, name in enumerate(names):
        tvs = [rand((5, 7), 100 * k + i) for i in range(3)]
        depth = settings.layer_index(name)
        lam = 0.25 if depth is None else 0.25 + 2.0 * depth[1] / 11
        want = plain.merge_resolved(name, torch.zeros(5, 7), tvs) * lam
        torch.testing.assert_close(scaled.merge_resolved(name, torch.zeros(5, 7), tvs), want, rtol=0, atol=0)


def test_lines_modifier_scales_chunks(monkeypatch):
    """The chunked form (full fine-tunes streamed) gets the same factor, chunk by chunk."""
    monkeypatch.setattr(masks, "BLOCK", 256)  # small blocks: the tensor spans several chunks
    monkeypatch.setattr(streaming, "BLOCK", 256)
    names = LLAMA_NAMES
    name = "model.layers.5.mlp.down_proj.weight"
    tvs = [rand((40, 51), i) for i in range(3)]
    base = torch.zeros(40, 51)
    fb, ft = base.reshape(-1), [t.reshape(-1) for t in tvs]

    def read(s, e):
        return fb[s:e], [t[s:e] for t in ft]

    read.chunk = 512
    for cls in (TaskArithmetic, TiesMerge):
        m = _method(cls, names, 3, lines=[0.5, 1.0])
        out = torch.empty(base.numel())
        for s, e, merged in m.merge_chunks_resolved(name, read, base.numel(), 3):
            out[s:e] = merged
        torch.testing.assert_close(out.view(40, 51), m.merge_resolved(name, base, tvs), rtol=1e-6, atol=1e-7)
        plain = _method(cls, names, 3)
        torch.testing.assert_close(out.view(40, 51), plain.merge_resolved(name, base, tvs) * (0.5 + 5 / 11),
                                   rtol=1e-6, atol=1e-7)


def test_lines_is_off_by_default_and_not_searched():
    m = instantiate("ties_merge")
    assert "lines" not in m.hparams and "lines" in m.all_hyperparameters()
    space = build_space(["ties_merge"], {"ties_merge": m.all_hyperparameters()}, 2, [])
    assert all(d.key != "lines" for d in space.dims["ties_merge"])
    with pytest.raises(ConfigError, match="lines"):
        build_space(["ties_merge"], {"ties_merge": m.all_hyperparameters()}, 2, [("lines", "0:1")])


# ------------------------------------------------------------------------------------------------------
# CART
# ------------------------------------------------------------------------------------------------------
CART_KEYS = {"model.layers.0.self_attn.q_proj.weight": (12, 9), "model.layers.1.mlp.down_proj.weight": (7, 16),
             "model.layers.0.input_layernorm.weight": (9,), "model.embed_tokens.weight": (11, 8)}
SVD_KEYS = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}


@pytest.mark.parametrize("n, ratio, prior, energy", [(4, 0.3, 2.0, False), (3, 0.12, 1.5, False), (5, 0.05, 1.0, False),
                                                      (4, 0.0, 2.0, False), (4, 1.0, 2.0, False),
                                                      (4, 0.6, 1.9, True), (1, 0.3, 2.0, False), (2, 0.3, 2.0, False)])
def test_cart_method_equals_reference(n, ratio, prior, energy):
    theta0 = {k: rand(s, 1) for k, s in CART_KEYS.items()}
    thetas = [{k: theta0[k] + 0.1 * rand(s, 50 + 7 * i + j) for j, (k, s) in enumerate(CART_KEYS.items())}
              for i in range(n)]
    want = ref_cart(theta0, thetas, ratio, prior, SVD_KEYS, energy)
    m = _method(Cart, list(CART_KEYS), n, rank_ratio=ratio, scale=prior, rank_by="energy" if energy else "count")
    for key in CART_KEYS:
        tvs = [th[key] - theta0[key] for th in thetas]
        got = theta0[key] + m.merge_resolved(key, theta0[key], tvs)
        torch.testing.assert_close(f64(got), want[key], rtol=1e-5, atol=1e-5)


def test_cart_edge_cases():
    tvs = [rand((10, 6), i) for i in range(4)]
    mean = torch.stack(tvs).mean(0)
    torch.testing.assert_close(ops.cart([tvs[0]], 0.3, 2.0), tvs[0])  # one expert: τ back
    torch.testing.assert_close(ops.cart(tvs[:2], 0.5, 2.0), tvs[0] / 2 + tvs[1] / 2, atol=1e-5, rtol=0)  # T = 2
    assert torch.equal(ops.cart([torch.zeros(10, 6)] * 3, 0.3, 2.0), torch.zeros(10, 6))
    assert torch.equal(ops.cart(tvs, 0.0, 2.0), mean) and torch.equal(ops.cart(tvs, 1.0, 2.0), mean)
    assert torch.equal(ops.cart(tvs, 0.3, 2.0, low_rank=False), mean)
    assert torch.equal(ops.cart([t[0] for t in tvs], 0.3, 2.0), mean[0])  # 1-D: the average
    assert ops.cart_rank(torch.ones(6), 0.01) == 1 and ops.cart_rank(torch.ones(6), 0.5) == 3
    assert ops.cart_rank(torch.tensor([3.0, 4.0]), 0.36, "energy") == 1  # 9/25 reaches 0.36
    assert ops.cart_rank(torch.tensor([3.0, 4.0]), 0.37, "energy") == 2
    with pytest.raises(ConfigError, match="rank_ratio"):
        ops.cart(tvs, 1.5)
    with pytest.raises(ConfigError, match="rank_by"):
        ops.cart(tvs, 0.5, rank_by="nuclear")


# ------------------------------------------------------------------------------------------------------
# STAR
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, eta, shape", [(3, 40.0, (12, 9)), (2, 10.0, (6, 20)), (1, 75.0, (8, 8)),
                                            (4, 100.0, (9, 5)), (3, 0.0, (7, 7))])
def test_star_equals_reference(n, eta, shape):
    tvs = [rand(shape, 20 + i) for i in range(n)]
    m = _method(Star, ["model.layers.0.mlp.up_proj.weight"], n, eta=eta)
    got = m.merge_resolved("model.layers.0.mlp.up_proj.weight", torch.zeros(shape), tvs)
    torch.testing.assert_close(f64(got), ref_star_merge(tvs, eta), rtol=1e-5, atol=1e-5)


def test_star_rank_and_edge_cases():
    s = torch.tensor([5.0, 3.0, 1.0, 1.0])
    # smallest r with Σ_{j<r} σⱼ ≥ η % of 10 (searchsorted, left)
    for eta, r in [(0.0, 1), (50.0, 1), (50.1, 2), (80.0, 2), (80.5, 3), (90.0, 3), (100.0, 4)]:
        assert ops.star_rank(s, eta) == r, eta
    low = rand((10, 2), 3) @ rand((2, 7), 4)  # a rank-2 (LoRA-like) task matrix
    torch.testing.assert_close(ops.star([low], 100.0), low, rtol=1e-4, atol=1e-5)
    one = ops.star_truncate(low, 0.0)  # rank 1, nuclear norm kept
    sv = torch.linalg.svdvals(one)
    assert int((sv > 1e-4 * sv[0]).sum()) == 1
    torch.testing.assert_close(sv.sum(), torch.linalg.svdvals(low).sum(), rtol=1e-5, atol=0)
    assert torch.equal(ops.star([torch.zeros(5, 4)] * 2), torch.zeros(5, 4))  # no 0/0
    vecs = [rand((9,), i) for i in range(3)]  # 1-D: the plain mean
    torch.testing.assert_close(ops.star(vecs, 40.0), torch.stack(vecs).mean(0))
    with pytest.raises(ConfigError, match="eta"):
        ops.star(vecs, 101.0)


class FakeLora:
    """A LoRA expert as the engine sees it: ``factors`` (B·s, A) whose product is the task vector."""

    kind = "lora"

    def __init__(self, b, a):
        self.b, self.a, self.calls = b, a, 0

    def low_rank_only(self, name):
        return True

    def factors(self, name, device=None):
        self.calls += 1
        return self.b.to(device), self.a.to(device)


def test_star_takes_the_svd_of_lora_experts_from_their_factors():
    """The reference's known_rank shortcut, exact: same merge as the dense SVD, from QR + an r×r SVD."""
    name = "model.layers.0.self_attn.v_proj.weight"
    pairs = [(rand((30, r), i), rand((r, 20), 10 + i)) for i, r in enumerate((4, 8, 2))]
    tvs = [b @ a for b, a in pairs]
    m = _method(Star, [name], 3, eta=40.0)
    m.experts = [FakeLora(b, a) for b, a in pairs]
    got = m.merge_resolved(name, torch.zeros(30, 20), tvs)
    assert all(e.calls == 1 for e in m.experts)
    torch.testing.assert_close(f64(got), ref_star_merge(tvs, 40.0), rtol=1e-4, atol=1e-5)
    m.experts[1] = type("Full", (), {"kind": "full", "factors": lambda self, n, d=None: None})()
    torch.testing.assert_close(f64(m.merge_resolved(name, torch.zeros(30, 20), tvs)), ref_star_merge(tvs, 40.0),
                               rtol=1e-4, atol=1e-5)  # a full expert among them: dense SVD for it
    assert m.lora_factors("model.embed_tokens.weight", tvs) is None  # vocabulary tensors: never from factors


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_ops_on_cuda_match_cpu():
    tvs = [rand((64, 48), i) for i in range(3)]
    gpu = [t.cuda() for t in tvs]
    for fn in (lambda x: ops.cart(x, 0.25, 2.0), lambda x: ops.star(x, 40.0), lambda x: ops.lines(x[0], 3, 8, 0.5, 1.0)):
        out = fn(gpu)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), fn(tvs), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# end to end (CLI on the tiny models)
# ------------------------------------------------------------------------------------------------------
def _run(capsys, tmp_path, args):
    code = main([*args, "--no-eval", "--quiet", "--output_folder", str(tmp_path)])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("method", ["lines", "cart", "star"])
def test_cli_smoke(capsys, tmp_path, method):
    _run(capsys, tmp_path, ["-m", method, "--tiny", "--save", "none"])


def test_cli_ties_with_lines(capsys, tmp_path):
    _run(capsys, tmp_path, ["-m", "ties_merge", "--tiny", "--set", "lines=0.5,1.0", "--save", "none"])
    report = json.loads((tmp_path / "ties_merge" / "report.json").read_text())
    assert report["hyperparameters"]["lines"] == [0.5, 1.0]


def _state(path):
    return load_file(str(next(path.glob("*.safetensors"))))


def _lam(name, alpha, beta, n_layers):
    m = re.search(r"\.layers\.(\d+)\.", name)
    return alpha if m is None else alpha + beta * int(m.group(1)) / (n_layers - 1)


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("method, sets", [("task_arithmetic", ["weights=0.6,0.3,0.5"]),
                                          ("ties_merge", ["density=0.5"]),
                                          ("dare_ties", ["density=0.6"])])
def test_lines_modifier_end_to_end_equals_scaled_merge(capsys, tmp_path, kind, method, sets):
    """θ(lines) = θ₀ + λ(l)·(θ_merged − θ₀) for every tensor, λ by hand from the tensor's block index."""
    base = tiny.base_dir("decoder")
    experts = [str(tiny.full_expert_dir("decoder", i) if kind == "full" else tiny.lora_expert_dir("decoder", i))
               for i in range(3)]
    common = ["-m", method, "--base-model", str(base), "--models", *experts, "--seed", "7"]
    _run(capsys, tmp_path / "plain", [*common, "--set", *sets])
    _run(capsys, tmp_path / "lines", [*common, "--set", *sets, "lines=0.5,1.5"])
    theta0 = _state(base)
    plain = _state(tmp_path / "plain" / method / "merged_model")
    scaled = _state(tmp_path / "lines" / method / "merged_model")
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    changed = 0
    for name, t0 in theta0.items():
        t0 = t0.to(torch.float64)
        want = t0 + _lam(name, 0.5, 1.5, n_layers) * (plain[name].to(torch.float64) - t0)
        torch.testing.assert_close(scaled[name].to(torch.float64), want, rtol=1e-5, atol=1e-6)
        changed += int(not torch.equal(plain[name], theta0[name]))
    assert changed > 0
    stats = json.loads((tmp_path / "lines" / method / "report.json").read_text())["merge_stats"]
    if kind == "full":  # streamed in chunks: the post-pass scaled the chunks
        assert stats["tensors_chunked"] > 0


@pytest.mark.parametrize("method, sets, expected", [
    ("cart", ["rank_ratio=0.25", "scale=1.5"],
     lambda b, e, layer: b + ops.cart([x - b for x in e], 0.25, 1.5, low_rank=layer)),
    ("star", ["eta=30"], lambda b, e, layer: b + ops.star([x - b for x in e], 30.0)),
    ("lines", ["beta=0.8"], lambda b, e, layer: b + sum(x - b for x in e) * ((1 / 3 + 0.8) if layer else 1 / 3)),
])
def test_cli_full_experts_equal_the_op(capsys, tmp_path, method, sets, expected):
    base = tiny.base_dir("decoder")
    experts = [tiny.full_expert_dir("decoder", i) for i in range(3)]
    _run(capsys, tmp_path, ["-m", method, "--base-model", str(base), "--models", *map(str, experts), "--set", *sets])
    merged = _state(tmp_path / method / "merged_model")
    b0, es = _state(base), [_state(e) for e in experts]
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        want = expected(b0[name].float(), [e[name].float() for e in es], name.startswith("model.layers."))
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-5)


def test_lines_in_a_recipe_and_recipe_yml_round_trip(capsys, tmp_path):
    base = str(tiny.base_dir("decoder"))
    e0, e1 = (str(tiny.full_expert_dir("decoder", i)) for i in range(2))
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: ties_merge\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\n"
                    "parameters:\n  density: 0.5\n  lines: [0.25, 1.0]\n")
    recipe = load_recipe(path)
    m = instantiate(recipe.method)
    apply_recipe(m, recipe)
    assert m.hparams["lines"] == [0.25, 1.0]
    path.write_text(path.read_text().replace("[0.25, 1.0]", "'0.25,1.0'"))  # the --set form works in a recipe too
    recipe = load_recipe(path)
    apply_recipe(m := instantiate(recipe.method), recipe)
    assert m.hparams["lines"] == [0.25, 1.0]
    _run(capsys, tmp_path / "a", ["-m", "ties_merge", "--base-model", base, "--models", e0, e1,
                                  "--set", "density=0.5", "lines=0.25,1.0"])
    written = tmp_path / "a" / "ties_merge" / "recipe.yml"
    assert "lines: [0.25, 1.0]" in written.read_text()
    _run(capsys, tmp_path / "b", ["--recipe", str(written)])
    a, b = _state(tmp_path / "a" / "ties_merge" / "merged_model"), _state(tmp_path / "b" / "ties_merge" / "merged_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, key", [
    (["-m", "cart", "--set", "rank_ratio=1.5"], "rank_ratio"),
    (["-m", "cart", "--set", "rank_by=nuclear"], "rank_by"),
    (["-m", "star", "--set", "eta=150"], "eta"),
    (["-m", "star", "--set", "eta=abc"], "eta"),
    (["-m", "lines", "--set", "beta=-1"], "beta"),
    (["-m", "lines", "--set", "weights=1,2,3"], "weights"),
    (["-m", "lines", "--set", "lines=0.5,1"], "lines"),
    (["-m", "ties_merge", "--set", "lines=0.5"], "lines"),
    (["-m", "ties_merge", "--set", "lines=1,2,3"], "lines"),
    (["-m", "ties_merge", "--set", "lines=a,b"], "lines"),
    (["-m", "ties_merge", "--set", "lines=-0.5,1"], "lines"),
    (["-m", "ties_merge", "--set", "lines={gradient: [0, 1]}"], "lines"),
    (["-m", "passthrough", "--set", "lines=0.5,1"], "lines"),
])
def test_bad_hyperparameters_are_one_line_errors(capsys, tmp_path, args, key):
    code = main([*args, "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and key in err[0], err
