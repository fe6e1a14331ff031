"""Merges without a base model (mergekit's linear, karcher, nuslerp, multislerp, passthrough take none): the
first model is the template, the models' own weights are merged. Checked against direct per-tensor formulas
on the raw checkpoints (float64), and against mergekit 0.1.5 when it is installed (``$MERGEKIT_VENV`` or
``mergekit-yaml`` on PATH)."""
import json
import math
import os
import subprocess

import pytest
import torch
import yaml
from conftest import dir_tensors, mergekit_tool
from transformers import AutoConfig, AutoModelForCausalLM

from llm_merging.main import main
from llm_merging.merging.factory import instantiate
from llm_merging.merging.recipe import apply_recipe, load_recipe
from llm_merging.model import tiny

LAYERS = 4
GRAD = [0.2, 0.9, 0.5]  # a gradient over depth: interpolated at t = layer / (LAYERS − 1)
FILT = [{"filter": "self_attn", "value": [0.3, 0.8]}, {"filter": "mlp", "value": 0.6}, {"value": 0.45}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three full models of a 4-layer tiny Llama (shared weights plus seeded noise), each with a tokenizer."""
    root = tmp_path_factory.mktemp("base-free")
    config = AutoConfig.from_pretrained(str(tiny.base_dir("decoder")))
    config.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    shared = AutoModelForCausalLM.from_config(config).state_dict()
    paths = []
    for i in range(3):
        model = AutoModelForCausalLM.from_config(config)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in shared.items()})
        path = root / f"model{i}"
        model.save_pretrained(str(path))
        tiny.build_tokenizer(path)
        paths.append(str(path))
    return paths




def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _setting(value, name: str):
    """mergekit's evaluation of a parameter for tensor ``name``: filters (substring), then gradients over depth."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        value = next(c["value"] for c in value if "filter" not in c or c["filter"] in name)
    if isinstance(value, list):
        layer = _layer(name)
        t = 0.0 if layer is None else layer / (LAYERS - 1)
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        return (1 - (scaled - i0)) * value[i0] + (scaled - i0) * value[i1]
    return value


def _run_recipe(tmp_path, doc: dict, tag: str) -> dict[str, torch.Tensor]:
    path = tmp_path / f"{tag}.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / f"out-{tag}"
    assert main(["--recipe", str(path), "--output_folder", str(out), "--no-eval", "--quiet"]) == 0
    (merged,) = list(out.glob("*/merged_model"))
    return dir_tensors(merged)


# ----------------------------------------------------------------------------- independent computations
def _karcher(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher mean on the sphere with equal weights, rescaled to the mean norm (float64)."""
    norms = [float(x.norm()) for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    a = 1.0 / len(xs)
    mean = sum(a * u for u in units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = float(torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * (theta / math.sin(theta)) * (u - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / mean.norm()
    return sum(a * n for n in norms) * mean


def _slerp_rows(x0: torch.Tensor, x1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of each row of x0 towards x1 (float64)."""
    n0, n1 = x0.norm(dim=-1, keepdim=True), x1.norm(dim=-1, keepdim=True)
    cos = ((x0 / n0) * (x1 / n1)).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    return (torch.sin((1 - t) * theta) * x0 + torch.sin(t * theta) * x1) / torch.sin(theta)


def _nuslerp(x0: torch.Tensor, x1: torch.Tensor, w0: float, w1: float, flatten: bool = True) -> torch.Tensor:
    t = w1 / (w0 + w1)
    if flatten or x0.dim() == 1:
        return _slerp_rows(x0.reshape(1, -1), x1.reshape(1, -1), t).reshape(x0.shape)
    return _slerp_rows(x0, x1, t)


def _multislerp(xs: list[torch.Tensor], ws: list[float], eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation on the sphere: the weighted mean direction times the weighted mean norm."""
    total = sum(ws)
    ws = [w / total for w in ws]
    norms = [float(x.norm()) for x in xs]
    mean = sum(w * x / (n + eps) for w, x, n in zip(ws, xs, norms))
    return mean / mean.norm() * sum(w * n for w, n in zip(ws, norms))


def _check(ours: dict, raw: list[dict], formula, rtol: float = 1e-5) -> None:
    assert set(ours) == set(raw[0])
    for name, got in ours.items():
        want = formula(name, [r[name].double() for r in raw])
        err = float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-12)
        assert err <= rtol, f"{name}: relative difference {err:.2e}"


# ----------------------------------------------------------------------------------------------- tests
def test_linear_without_base_with_filters_and_gradients(tmp_path, models):
    w = [[{"filter": "mlp", "value": GRAD}, {"value": 0.7}], FILT, 0.25]
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": wi}} for m, wi in zip(models, w)]}
    ours = _run_recipe(tmp_path, doc, "linear")
    raw = [dir_tensors(m) for m in models]

    def formula(name, xs):
        ws = [_setting(wi, name) for wi in w]
        return sum(wi * x for wi, x in zip(ws, xs)) / sum(ws)

    _check(ours, raw, formula)
    # a gradient really interpolates between its anchors (layer 1 of 4: t = 1/3)
    assert _setting(w[0], "model.layers.1.mlp.up_proj.weight") == pytest.approx(0.2 + 0.7 * 2 / 3)


def test_linear_without_base_unnormalized(tmp_path, models):
    doc = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
           "models": [{"model": m, "parameters": {"weight": wi}} for m, wi in zip(models, (0.5, [0.1, 0.4], 0.3))]}
    ours = _run_recipe(tmp_path, doc, "linear-unnorm")
    raw = [dir_tensors(m) for m in models]
    _check(ours, raw, lambda name, xs: 0.5 * xs[0] + _setting([0.1, 0.4], name) * xs[1] + 0.3 * xs[2])


def test_karcher_without_base(tmp_path, models):
    doc = {"merge_method": "karcher", "dtype": "float32", "models": [{"model": m} for m in models]}
    ours = _run_recipe(tmp_path, doc, "karcher")
    _check(ours, [dir_tensors(m) for m in models], lambda name, xs: _karcher(xs))


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_without_base_interpolates_the_weights(tmp_path, models, flatten):
    doc = {"merge_method": "nuslerp", "dtype": "float32", "parameters": {"nuslerp_flatten": flatten},
           "models": [{"model": models[0], "parameters": {"weight": 0.3}},
                      {"model": models[2], "parameters": {"weight": GRAD}}]}
    ours = _run_recipe(tmp_path, doc, f"nuslerp-{flatten}")
    raw = [dir_tensors(models[0]), dir_tensors(models[2])]
    _check(ours, raw, lambda name, xs: _nuslerp(xs[0], xs[1], 0.3, _setting(GRAD, name), flatten))


def test_multislerp_without_base(tmp_path, models):
    w = [1.0, GRAD, FILT]
    doc = {"merge_method": "multislerp", "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": wi}} for m, wi in zip(models, w)]}
    ours = _run_recipe(tmp_path, doc, "multislerp")
    _check(ours, [dir_tensors(m) for m in models],
           lambda name, xs: _multislerp(xs, [_setting(wi, name) for wi in w]))


def test_cli_with_models_only(tmp_path, models):
    """--models without --base-model: the first model is the template (config, tokenizer); recipe.yml has no
    base_model and reproduces the run; the saved directory loads back."""
    out = tmp_path / "out"
    assert main(["-m", "multislerp", "--models", *models, "--set", "weights=1,2,3", "--output_folder", str(out),
                 "--no-eval", "--quiet"]) == 0
    run = out / "multislerp"
    got = dir_tensors(run / "merged_model")
    _check(got, [dir_tensors(m) for m in models], lambda name, xs: _multislerp(xs, [1.0, 2.0, 3.0]))
    recipe = yaml.safe_load((run / "recipe.yml").read_text())
    assert "base_model" not in recipe and [m["model"] for m in recipe["models"]] == models
    report = json.loads((run / "report.json").read_text())
    assert report["models"]["base"]["id"] == models[0]
    model = AutoModelForCausalLM.from_pretrained(str(run / "merged_model"))
    assert model.config.num_hidden_layers == LAYERS
    assert torch.equal(model.state_dict()["model.layers.3.mlp.up_proj.weight"], got["model.layers.3.mlp.up_proj.weight"])
    assert (run / "merged_model" / "tokenizer_config.json").is_file()
    again = _run_recipe(tmp_path, recipe, "again")  # recipe.yml reproduces the merge
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_cli_karcher_ignores_include_base_without_a_base(tmp_path, models):
    out = tmp_path / "out"
    assert main(["-m", "karcher", "--models", *models, "--output_folder", str(out), "--no-eval", "--quiet"]) == 0
    _check(dir_tensors(out / "karcher" / "merged_model"), [dir_tensors(m) for m in models], lambda name, xs: _karcher(xs))


def test_recipe_sets_the_first_model_as_template(tmp_path, models):
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "karcher", "models": [{"model": m} for m in models]}))
    recipe = load_recipe(path)
    assert recipe.base_free and recipe.base_model == models[0] and recipe.models == models
    method = instantiate(recipe.method)
    apply_recipe(method, recipe)
    assert method.base_free and [e["kind"] for e in method.preflight()["experts"]] == ["base", "full", "full"]


@pytest.mark.parametrize("method, why", [("ties", "task vectors"), ("task_arithmetic", "task vectors"),
                                         ("slerp", "from the base"), ("model_stock", "towards the base"),
                                         ("nearswap", "moves the base")])
def test_recipe_method_that_needs_a_base(capsys, tmp_path, models, method, why):
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": method, "models": [{"model": m} for m in models[:2]]}))
    code = main(["--recipe", str(path), "--output_folder", str(tmp_path / "out"), "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(path) in err[0] and f"merge method '{method}' needs a base_model" in err[0] and why in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_cli_method_that_needs_a_base(capsys, tmp_path, models):
    code = main(["-m", "ties_merge", "--models", *models, "--output_folder", str(tmp_path / "out"), "--no-eval",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "merge method 'ties_merge' needs a base model (--base-model)" in err[0] and "task vectors" in err[0]


def test_lora_experts_without_a_base_are_refused(capsys, tmp_path):
    adapters = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]
    code = main(["-m", "linear", "--models", *adapters, "--output_folder", str(tmp_path / "out"), "--no-eval",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a LoRA adapter" in err[0] and "--base-model" in err[0], err
    base = str(tiny.base_dir("decoder"))
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [f"{base}+{a}" for a in adapters]}))
    code = main(["--recipe", str(path), "--output_folder", str(tmp_path / "out"), "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "LoRA adapter" in err[0] and "set base_model" in err[0], err


# ------------------------------------------------------------------------------------------ mergekit
MERGEKIT = mergekit_tool("mergekit-yaml")


def _parity_recipes(models):
    m0, m1, m2 = models
    return {
        "linear": {"merge_method": "linear",
                   "models": [{"model": m0, "parameters": {"weight": [{"filter": "mlp", "value": GRAD}, {"value": 0.7}]}},
                              {"model": m1, "parameters": {"weight": FILT}}, {"model": m2, "parameters": {"weight": 0.25}}]},
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in models]},
        "nuslerp": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                    "models": [{"model": m0, "parameters": {"weight": 0.3}}, {"model": m1, "parameters": {"weight": GRAD}}]},
        "multislerp": {"merge_method": "multislerp",
                       "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (1.0, GRAD, FILT))]},
    }


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-yaml not found ($MERGEKIT_VENV or PATH)")
@pytest.mark.parametrize("kind", ["linear", "karcher", "nuslerp", "multislerp"])
def test_equals_mergekit(tmp_path, models, kind):
    doc = {**_parity_recipes(models)[kind], "dtype": "float32"}
    ours = _run_recipe(tmp_path, doc, kind)
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run([MERGEKIT, str(path), str(tmp_path / "mk"), "--quiet"], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    theirs = dir_tensors(tmp_path / "mk")
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        err = float((ours[name].double() - t.double()).abs().max()) / max(float(t.abs().max()), 1e-12)
        assert err <= 1e-5, f"{kind} {name}: {err:.2e} from mergekit"


def _geometric_median(xs: list[torch.Tensor], iters: int = 2000) -> torch.Tensor:
    """Weiszfeld's iteration from the mean, run to convergence (float64)."""
    z = sum(xs) / len(xs)
    for _ in range(iters):
        d = [max(float((x - z).norm()), 1e-300) for x in xs]
        new = sum(x / di for x, di in zip(xs, d)) / sum(1 / di for di in d)
        if float((new - z).norm()) <= 1e-15 * max(float(new.norm()), 1.0):
            return new
        z = new
    return z


def test_geometric_median_without_base(tmp_path, models):
    out = tmp_path / "out"
    assert main(["-m", "geometric_median", "--models", *models, "--set", "eps=1e-9", "max_iter=1000",
                 "--output_folder", str(out), "--no-eval", "--quiet"]) == 0
    _check(dir_tensors(out / "geometric_median" / "merged_model"), [dir_tensors(m) for m in models],
           lambda name, xs: _geometric_median(xs))
