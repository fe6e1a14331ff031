"""mergekit 0.1.5 conventions under ``--recipe``: each option against an independent NumPy computation of
mergekit's formula, the recipe → method/hyperparameter mapping for every mapped method, and end-to-end
``--recipe`` runs. mergekit itself is never imported (``benchmarks/mergekit_parity.py`` runs it)."""
import numpy as np
import pytest
import torch
from conftest import dir_tensors

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.merging import get_method_class, settings
from llm_merging.merging.recipe import apply_recipe, load_recipe
from llm_merging.model import tiny


def _distinct(shape, seed, scale=1.0):
    """fp32 values with pairwise distinct magnitudes (so top-k sets have no ties)."""
    g = np.random.default_rng(seed)
    n = int(np.prod(shape))
    mags = g.permutation(np.arange(1, n + 1)).astype(np.float64) / n * scale
    signs = np.where(g.random(n) < 0.5, -1.0, 1.0)
    return torch.tensor((mags * signs).reshape(shape), dtype=torch.float32)


# ------------------------------------------------------------------ NumPy references of mergekit 0.1.5
def np_magnitude(x, density):
    """mergekit ``sparsify.magnitude``: keep the top max(1, int(density·n)) by |x|."""
    if density >= 1:
        return x.copy()
    k = max(1, int(density * x.size))
    keep = np.argsort(-np.abs(x).ravel(), kind="stable")[:k]
    m = np.zeros(x.size)
    m[keep] = 1
    return x * m.reshape(x.shape)


def np_magnitude_outliers(x, density, gamma):
    """mergekit ``sparsify.magnitude_outliers``."""
    if density >= 1:
        return x.copy()
    n = x.size
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    idx = np.argsort(np.abs(x).ravel(), kind="stable")
    m = np.zeros(n)
    m[idx[bot:bot + target]] = 1
    return x * m.reshape(x.shape)


def np_gta(deltas, weights, consensus, normalize, lam=1.0):
    """mergekit ``GeneralizedTaskArithmeticMerge.merge_group`` after sparsification: merged task vector."""
    d = np.stack(deltas).astype(np.float64)
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (d.ndim - 1)))
    d = d * w
    if consensus:
        majority = np.where(d.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(d) == majority
        mixed = (d * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = d.sum(0)
        divisor = w.sum(0)
        divisor[np.abs(divisor) < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam


def np_model_stock(deltas, filter_wise=False):
    """mergekit ``model_stock`` as a merged task vector t·mean(τ) (its t·avg + (1−t)·θ₀ minus θ₀)."""
    shape = deltas[0].shape
    ds = [d.astype(np.float64) for d in deltas]
    if filter_wise:
        ds = [d.reshape(1, -1) if d.ndim == 1 else d for d in ds]
    else:
        ds = [d.reshape(-1) for d in ds]
    cos = []
    for i in range(len(ds)):
        for j in range(i + 1, len(ds)):
            den = np.maximum(np.linalg.norm(ds[i], axis=-1) * np.linalg.norm(ds[j], axis=-1), 1e-6)
            cos.append(np.clip((ds[i] * ds[j]).sum(-1) / den, -1, 1))
    c = np.mean(cos, axis=0)[..., None] if filter_wise else np.mean(cos)
    n = len(ds)
    den = 1 + (n - 1) * c
    t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
    return (t * (sum(ds) / n)).reshape(shape)


# ------------------------------------------------------------------ keep counts
@pytest.mark.parametrize("density", [0.4567, 0.35, 0.001, 0.999, 1.0])
def test_floor_keep_count_matches_mergekit_magnitude(density):
    x = _distinct((37, 29), 0)
    ours = torch.where(ops.magnitude_mask(x, density, keep_count="floor"), x, 0.0)
    np.testing.assert_array_equal(ours.numpy(), np_magnitude(x.numpy(), density))
    n = x.numel()
    assert int(ops.magnitude_mask(x, density, keep_count="floor").sum()) == (n if density >= 1 else max(1, int(density * n)))


def test_round_keep_count_is_still_the_default():
    x = _distinct((10,), 1)
    assert int(ops.magnitude_mask(x, 0.25).sum()) == 3  # round(2.5) half up
    assert int(ops.magnitude_mask(x, 0.25, keep_count="floor").sum()) == 2
    with pytest.raises(ConfigError, match="keep_count"):
        ops.magnitude_mask(x, 0.25, keep_count="ceil")


@pytest.mark.parametrize("density, gamma", [(0.83, 0.037), (0.61, 0.011), (0.9, 0.2), (0.004, 0.0), (0.5, 0.0)])
def test_floor_breadcrumbs_matches_mergekit_magnitude_outliers(density, gamma):
    x = _distinct((41, 23), 2)
    ours = torch.where(ops.breadcrumbs_mask(x, density, gamma, keep_count="floor"), x, 0.0)
    np.testing.assert_array_equal(ours.numpy(), np_magnitude_outliers(x.numpy(), density, gamma))


# ------------------------------------------------------------------ TIES family, mergekit's way
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_floor_weighted_sign_weight_sum_matches_mergekit(normalize):
    xs = [_distinct((33, 31), 10 + i, scale=0.1) for i in range(3)]
    dens, w = [0.35, 0.6, 0.27], [0.7, -0.4, 0.5]
    ours = ops.ties(xs, density=dens, weights=w, scale=0.9, keep_count="floor", weighted_sign=True,
                    sign_method="total", divisor="weight_sum" if normalize else None)
    want = np_gta([np_magnitude(x.numpy(), d) for x, d in zip(xs, dens)], w, True, normalize, 0.9)
    np.testing.assert_allclose(ours.numpy(), want, rtol=1e-5, atol=1e-7)
    # our defaults (round, unweighted sign, count divisor) differ on these inputs
    assert not np.allclose(ops.ties(xs, density=dens, weights=w, scale=0.9).numpy(), want, rtol=1e-5, atol=1e-7)


def test_breadcrumbs_ties_and_linear_variants_match_mergekit():
    xs = [_distinct((29, 27), 20 + i, scale=0.1) for i in range(3)]
    dens, gam, w = [0.8, 0.55, 0.9], [0.03, 0.011, 0.0], [0.7, 0.5, 0.3]
    sparse = [np_magnitude_outliers(x.numpy(), d, g) for x, d, g in zip(xs, dens, gam)]
    ours = ops.breadcrumbs(xs, density=dens, gamma=gam, weights=w, consensus="ties", keep_count="floor",
                           weighted_sign=True, divisor=None)
    np.testing.assert_allclose(ours.numpy(), np_gta(sparse, w, True, False), rtol=1e-5, atol=1e-7)
    # breadcrumbs (no consensus) with mergekit normalize: divide by the sum of all the weights
    cls = get_method_class("breadcrumbs")
    m = cls()
    m.hparams = {"density": dens, "gamma": gam, "weights": w, "scale": 1.0, "keep_count": "floor",
                 "divisor": "weight_sum"}
    got = m.merge_tensor("x", torch.zeros(29, 27), xs)
    np.testing.assert_allclose(got.numpy(), np_gta(sparse, w, False, True), rtol=1e-5, atol=1e-7)


def test_task_arithmetic_divisor_matches_mergekit_normalize():
    xs = [_distinct((9, 7), 30 + i) for i in range(3)]
    w = [0.7, 0.5, 0.4]
    m = get_method_class("task_arithmetic")()
    m.hparams = {"weights": w, "scale": 1.2, "divisor": "weight_sum"}
    want = np_gta([x.numpy() for x in xs], w, False, True, 1.2)
    np.testing.assert_allclose(m.merge_tensor("x", torch.zeros(9, 7), xs).numpy(), want, rtol=1e-5, atol=1e-6)
    m.hparams["divisor"] = "none"
    np.testing.assert_allclose(m.merge_tensor("x", torch.zeros(9, 7), xs).numpy(),
                               np_gta([x.numpy() for x in xs], w, False, False, 1.2), rtol=1e-5, atol=1e-6)
    # weights summing to ~0: mergekit leaves the sum undivided
    m.hparams = {"weights": [0.5, -0.5, 0.0], "scale": 1.0, "divisor": "weight_sum"}
    np.testing.assert_allclose(m.merge_tensor("x", torch.zeros(9, 7), xs).numpy(),
                               np_gta([x.numpy() for x in xs], [0.5, -0.5, 0.0], False, True), rtol=1e-5, atol=1e-6)


def test_linear_unnormalized_is_the_weighted_sum_of_the_models():
    base = _distinct((6, 5), 40)
    xs = [_distinct((6, 5), 41 + i, scale=0.1) for i in range(2)]
    m = get_method_class("linear")()
    m.hparams = {"weights": [0.6, 0.9], "normalize": False}
    got = base + m.merge_tensor("x", base.clone(), xs)
    want = 0.6 * (base + xs[0]).double() + 0.9 * (base + xs[1]).double()
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_della_linear_l1_rescale_keeps_each_l1_norm():
    x = _distinct((20, 30), 50)
    m = get_method_class("della_linear")()
    m.seed = 0
    m.hparams = {"density": [0.5], "epsilon": [0.1], "weights": [1.0], "scale": 1.0, "rescale": "l1", "divisor": "none"}
    out = m.merge_tensor("x", torch.zeros(20, 30), [x])
    assert float(out.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)
    assert 0.3 < float((out != 0).float().mean()) < 0.7


# ------------------------------------------------------------------ model stock
def _negative_agreement(shape=(16, 12)):
    """Three task vectors with a negative mean pairwise cosine (but > −1/2)."""
    g = torch.Generator().manual_seed(3)
    c = torch.randn(shape, generator=g)
    signs = (1.0, 0.8, -0.9)
    return [s * c + torch.randn(shape, generator=g) for s in signs]


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_extrapolate_matches_mergekit(filter_wise):
    ts = _negative_agreement()
    want = np_model_stock([t.numpy() for t in ts], filter_wise)
    got = ops.model_stock(ts, filter_wise=filter_wise, extrapolate=True)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    if not filter_wise:
        assert ops.model_stock_ratio(ts, extrapolate=True) < 0  # extrapolated away from the average
        assert ops.model_stock_ratio(ts) == 0.0  # ours (default): clamped, θ = θ₀
        assert torch.count_nonzero(ops.model_stock(ts)) == 0


def test_model_stock_extrapolate_singular_keeps_the_base():
    a = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    out = ops.model_stock([a, -a], extrapolate=True)  # cos = −1 = −1/(N−1): 1 + (N−1)c = 0
    assert torch.count_nonzero(out) == 0
    np.testing.assert_allclose(out.numpy(), np_model_stock([a.numpy(), -a.numpy()]), atol=1e-7)


def test_model_stock_positive_agreement_is_unchanged_by_extrapolate():
    g = torch.Generator().manual_seed(5)
    c = torch.randn(8, 8, generator=g)
    ts = [c + 0.5 * torch.randn(8, 8, generator=g) for _ in range(3)]
    torch.testing.assert_close(ops.model_stock(ts, extrapolate=True), ops.model_stock(ts), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ recipes → methods and hyperparameters
NAMES = ["model.embed_tokens.weight",
         *[f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj.weight", "mlp.up_proj.weight")],
         "model.norm.weight", "lm_head.weight"]
Q0, Q1, UP1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def paths():
    return str(tiny.base_dir("decoder")), [str(tiny.full_expert_dir("decoder", i)) for i in range(3)]


def _resolve(tmp_path, text):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    recipe = load_recipe(path)
    method = get_method_class(recipe.method)()
    apply_recipe(method, recipe)
    method.layout = settings.Layout(NAMES, recipe.slice_lengths)
    return recipe, method, lambda name: method.resolve_hparams(name)


def _models(experts, params):
    return "".join(f"  - model: {e}\n    parameters: {p}\n" for e, p in zip(experts, params))


def test_recipe_linear_base_first_and_added(tmp_path, paths):
    b, (e0, e1, _) = paths
    r, _, h = _resolve(tmp_path, f"merge_method: linear\nbase_model: {b}\nmodels:\n"
                                 + _models([e0, b], ["{weight: 0.7}", "{weight: 0.3}"]))
    assert r.method == "linear" and r.models == [b, e0]
    assert h(Q0)["weights"] == [0.3, 0.7] and h(Q0)["normalize"] is True
    r, _, h = _resolve(tmp_path, f"merge_method: linear\nbase_model: {b}\nparameters: {{weight: 0.5, normalize: false}}\n"
                                 f"models:\n" + _models([e0, e1], ["{weight: [0.2, 0.8]}", "{}"]))
    assert r.models == [b, e0, e1]
    assert h(Q0)["weights"] == [0.5, 0.2, 0.5] and h(Q1)["weights"] == [0.5, 0.8, 0.5]
    assert h(Q0)["normalize"] is False


def test_recipe_task_arithmetic(tmp_path, paths):
    b, (e0, e1, _) = paths
    r, _, h = _resolve(tmp_path, f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{lambda: 0.8}}\nmodels:\n"
                                 + _models([b, e0, e1], ["{}", "{weight: 1.0}", "{weight: -0.3}"]))
    assert r.method == "task_arithmetic" and r.models == [e0, e1]  # a listed base is the reference only
    assert {k: h(Q0)[k] for k in ("weights", "scale", "divisor")} == {"weights": [1.0, -0.3], "scale": 0.8, "divisor": "none"}
    _, _, h = _resolve(tmp_path, f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{normalize: true}}\n"
                                 f"models:\n" + _models([e0, e1], ["{weight: 1}", "{weight: 2}"]))
    assert h(Q0)["divisor"] == "weight_sum" and h(Q0)["scale"] == 1.0


def test_recipe_ties(tmp_path, paths):
    b, (e0, e1, _) = paths
    _, _, h = _resolve(tmp_path, f"merge_method: ties\nbase_model: {b}\n"
                                 "parameters: {density: [{filter: self_attn, value: [0.2, 0.6]}, {value: 0.5}]}\nmodels:\n"
                                 + _models([e0, e1], ["{weight: 0.7}", "{weight: 0.4, density: 0.3}"]))
    v = h(Q1)
    assert v["density"] == [pytest.approx(0.6), 0.3] and v["weights"] == [0.7, 0.4]
    assert (v["keep_count"], v["weighted_sign"], v["sign_method"], v["divisor"], v["scale"]) == \
        ("floor", True, "total", "weight_sum", 1.0)
    assert h(UP1)["density"] == [0.5, 0.3] and h(Q0)["density"] == [pytest.approx(0.2), 0.3]
    _, _, h = _resolve(tmp_path, f"merge_method: ties\nbase_model: {b}\nparameters: {{normalize: false, lambda: 0.5}}\n"
                                 f"models:\n" + _models([e0, e1], ["{weight: 1}", "{weight: 1}"]))
    assert h(Q0)["divisor"] == "none" and h(Q0)["density"] == [1.0, 1.0] and h(Q0)["scale"] == 0.5


@pytest.mark.parametrize("name, ours, consensus, divisor", [
    ("breadcrumbs", "breadcrumbs", False, "none"), ("breadcrumbs_ties", "breadcrumbs_ties", True, "none")])
def test_recipe_breadcrumbs(tmp_path, paths, name, ours, consensus, divisor):
    b, (e0, e1, _) = paths
    r, _, h = _resolve(tmp_path, f"merge_method: {name}\nbase_model: {b}\nmodels:\n"
                                 + _models([e0, e1], ["{weight: 0.7, density: 0.8, gamma: 0.05}", "{weight: 0.5}"]))
    v = h(Q0)
    assert r.method == ours
    assert v["density"] == [0.8, 1.0] and v["gamma"] == [0.05, 0.01] and v["keep_count"] == "floor"
    assert v["divisor"] == divisor and ("weighted_sign" in v) == consensus
    if consensus:
        assert v["weighted_sign"] is True
    _, _, h = _resolve(tmp_path, f"merge_method: {name}\nbase_model: {b}\nparameters: {{normalize: true}}\nmodels:\n"
                                 + _models([e0, e1], ["{weight: 0.7}", "{weight: 0.5}"]))
    assert h(Q0)["divisor"] == "weight_sum"


@pytest.mark.parametrize("name, consensus, divisor", [
    ("dare_linear", False, "none"), ("dare_ties", True, "none"), ("della", True, "weight_sum"),
    ("della_linear", False, "none")])
def test_recipe_random_methods(tmp_path, paths, name, consensus, divisor):
    b, (e0, e1, _) = paths
    eps = "epsilon: 0.1, " if name.startswith("della") else ""
    r, _, h = _resolve(tmp_path, f"merge_method: {name}\nbase_model: {b}\nparameters: {{{eps}density: 0.6}}\nmodels:\n"
                                 + _models([e0, e1], ["{weight: 0.7}", "{weight: 0.5}"]))
    v = h(Q0)
    assert r.method == name and v["rescale"] == "l1" and v["divisor"] == divisor and v["density"] == [0.6, 0.6]
    if name.startswith("della"):
        assert v["epsilon"] == [0.1, 0.1]
    if consensus:
        assert v["weighted_sign"] is True and v["sign_method"] == "total"
    _, _, h = _resolve(tmp_path, f"merge_method: {name}\nbase_model: {b}\nparameters: {{rescale: false}}\nmodels:\n"
                                 + _models([e0, e1], ["{weight: 0.7}", "{weight: 0.5}"]))
    assert h(Q0)["rescale"] == "none" and h(Q0)["density"] == [1.0, 1.0]
    if name.startswith("della"):
        assert h(Q0)["epsilon"] == [0.15, 0.15]


def test_recipe_slerp_base_is_first_wherever_listed(tmp_path, paths):
    b, (e0, _, _) = paths
    r, _, h = _resolve(tmp_path, f"merge_method: slerp\nbase_model: {b}\n"
                                 "parameters: {t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]}\n"
                                 f"models:\n  - model: {e0}\n  - model: {b}\n")
    assert r.method == "slerp" and r.models == [b, e0]
    assert h(Q0)["t"] == 0 and h(Q1)["t"] == 1 and h(UP1)["t"] == 0.5 and h(Q0)["space"] == "weights"
    r, _, _ = _resolve(tmp_path, f"merge_method: slerp\nbase_model: {b}\nparameters: {{t: 0.3}}\nmodels:\n  - model: {e0}\n")
    assert r.models == [b, e0]


def test_recipe_model_stock(tmp_path, paths):
    b, experts = paths
    r, _, h = _resolve(tmp_path, f"merge_method: model_stock\nbase_model: {b}\nparameters: {{filter_wise: true}}\n"
                                 f"models:\n" + "".join(f"  - model: {e}\n" for e in [b, *experts]))
    assert r.method == "model_stock" and r.models == experts
    assert h(Q0)["extrapolate"] is True and h(Q0)["filter_wise"] is True


def test_recipe_slices_line_up(tmp_path, paths):
    b, (e0, e1, _) = paths
    text = (f"merge_method: ties\nbase_model: {b}\nparameters: {{weight: 0.5, density: 0.5}}\nslices:\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [0, 1]}}\n"
            f"      - {{model: {e0}, layer_range: [0, 1], parameters: {{density: 0.3}}}}\n"
            f"      - {{model: {e1}, layer_range: [0, 1]}}\n    parameters: {{weight: 0.9}}\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [1, 2]}}\n      - {{model: {e0}, layer_range: [1, 2]}}\n"
            f"      - {{model: {e1}, layer_range: [1, 2], parameters: {{weight: 0.8}}}}\n")
    r, _, h = _resolve(tmp_path, text)
    assert r.models == [e0, e1] and r.slice_lengths == [1, 1]
    assert h(Q0)["density"] == [0.3, 0.5] and h(Q0)["weights"] == [0.9, 0.9]
    assert h(Q1)["density"] == [0.5, 0.5] and h(Q1)["weights"] == [0.5, 0.8]


def test_recipe_rejects_what_mergekit_ignores_or_we_cannot_match(tmp_path, paths):
    b, (e0, _, _) = paths
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{density: 0.5}}\nmodels: [{e0}]\n")
    with pytest.raises(ConfigError, match="density: unknown parameter"):
        load_recipe(path)
    path.write_text(f"merge_method: ties\nbase_model: {b}\nparameters: {{rescale: true}}\nmodels: [{e0}]\n")
    with pytest.raises(ConfigError, match="rescale: unknown parameter"):
        load_recipe(path)


# ------------------------------------------------------------------ end to end


def _run(capsys, tmp_path, text):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    code = main(["--recipe", str(path), "--output_folder", str(tmp_path / "out"), "--quiet", "--no-eval"])
    assert code == 0, capsys.readouterr().err
    (merged,) = (tmp_path / "out").glob("*/merged_model")
    return dir_tensors(merged)


def test_ties_recipe_end_to_end_equals_mergekit_formula(capsys, tmp_path, paths):
    b, experts = paths
    dens, w = [0.35, 0.6, 0.27], [0.7, 0.4, 0.5]
    merged = _run(capsys, tmp_path, f"merge_method: ties\nbase_model: {b}\ndtype: float32\nmodels:\n"
                  + _models(experts, [f"{{weight: {wi}, density: {di}}}" for wi, di in zip(w, dens)]))
    base = dir_tensors(tiny.base_dir("decoder"))
    ex = [dir_tensors(tiny.full_expert_dir("decoder", i)) for i in range(3)]
    for name, t in base.items():
        deltas = [(e[name] - t).numpy() for e in ex]  # fp32 subtraction, as both tools compute it
        want = t.double().numpy() + np_gta([np_magnitude(d, di) for d, di in zip(deltas, dens)], w, True, True)
        np.testing.assert_allclose(merged[name].double().numpy(), want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_model_stock_and_slerp_recipes_end_to_end(capsys, tmp_path, paths):
    b, experts = paths
    base = dir_tensors(tiny.base_dir("decoder"))
    ex = [dir_tensors(tiny.full_expert_dir("decoder", i)) for i in range(3)]
    merged = _run(capsys, tmp_path / "ms", f"merge_method: model_stock\nbase_model: {b}\ndtype: float32\nmodels:\n"
                  + "".join(f"  - model: {e}\n" for e in experts))
    for name in (Q0, "model.norm.weight"):
        want = base[name].double().numpy() + np_model_stock([(e[name] - base[name]).numpy() for e in ex])
        np.testing.assert_allclose(merged[name].double().numpy(), want, rtol=1e-5, atol=1e-7)
    merged = _run(capsys, tmp_path / "sl", f"merge_method: slerp\nbase_model: {b}\ndtype: float32\n"
                  f"parameters: {{t: 0.3}}\nmodels:\n  - model: {experts[1]}\n  - model: {b}\n")
    a, c = base[Q0].double().reshape(-1), ex[1][Q0].double().reshape(-1)
    theta = np.arccos(float(a @ c / (a.norm() * c.norm())))
    want = (np.sin(0.7 * theta) * a.numpy() + np.sin(0.3 * theta) * c.numpy()) / np.sin(theta)  # t = 0 is the base
    np.testing.assert_allclose(merged[Q0].double().numpy().reshape(-1), want, rtol=1e-5, atol=1e-7)
