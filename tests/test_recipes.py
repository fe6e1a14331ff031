"""Per-tensor hyperparameters (gradients, filters, precedence), --recipe, and recipe.yml round trips."""
import json

import pytest
import torch
from safetensors.torch import load_file

from llm_merging.model import tiny
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.merging import settings
from llm_merging.merging.hparams import DENSITY, Param
from llm_merging.merging.recipe import load_recipe

NAMES = ["model.embed_tokens.weight", *[f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)],
         *[f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)], "model.norm.weight", "lm_head.weight"]


def value(setting, name, layout=None):
    layout = layout or settings.Layout(NAMES)
    return settings.evaluate(setting, layout.position(name))


# ------------------------------------------------------------------ gradients, filters, precedence
def test_gradient_first_middle_last_layer_and_outside_layers():
    g = settings.Gradient((1.0, 0.7, 0.1))
    assert value(g, "model.layers.0.mlp.up_proj.weight") == pytest.approx(1.0)
    assert value(g, "model.layers.1.mlp.up_proj.weight") == pytest.approx(0.85)  # t=.25, s=.5
    assert value(g, "model.layers.2.mlp.up_proj.weight") == pytest.approx(0.7)
    assert value(g, "model.layers.3.mlp.up_proj.weight") == pytest.approx(0.4)
    assert value(g, "model.layers.4.mlp.up_proj.weight") == pytest.approx(0.1)
    # mergekit 0.1.5 plans embeddings, the final norm and the head with t = 0
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert value(g, name) == pytest.approx(1.0)


def test_string_gradient_picks_and_one_layer_slice():
    g = settings.Gradient(("a", "b", "c"))
    assert [value(g, f"model.layers.{i}.mlp.up_proj.weight") for i in range(5)] == ["a", "a", "b", "b", "c"]
    one = settings.Layout(["model.layers.0.mlp.weight"])
    assert one.position("model.layers.0.mlp.weight").t == 1.0


def test_filter_first_match_wins_and_values_may_be_gradients():
    f = settings.from_yaml([{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.5}, {"value": 0.3}], "t")
    assert value(f, "model.layers.0.self_attn.q_proj.weight") == 0
    assert value(f, "model.layers.4.self_attn.q_proj.weight") == 1
    assert value(f, "model.layers.2.self_attn.q_proj.weight") == pytest.approx(0.5)
    assert value(f, "model.layers.3.mlp.up_proj.weight") == 0.5
    assert value(f, "lm_head.weight") == 0.3
    assert value(settings.from_yaml([{"filter": "mlp", "value": 1}], "t"), "lm_head.weight") is None


def test_slices_give_each_slice_its_own_depth():
    layout = settings.Layout(NAMES, slices=[2, 3])
    assert layout.position("model.layers.1.mlp.up_proj.weight") == settings.Position("model.layers.1.mlp.up_proj.weight", 1.0, 0)
    assert layout.position("model.layers.2.mlp.up_proj.weight").t == 0.0
    assert layout.position("model.layers.3.mlp.up_proj.weight").t == 0.5
    assert layout.position("lm_head.weight").slice == 1 and layout.position("model.embed_tokens.weight").slice == 0
    with pytest.raises(ConfigError, match="slices hold 4 layers"):
        settings.Layout(NAMES, slices=[2, 2])


def test_precedence_slice_source_over_slice_over_model_over_global(tmp_path):
    base, e0, e1 = str(tiny.base_dir("decoder")), str(tiny.full_expert_dir("decoder", 0)), str(tiny.full_expert_dir("decoder", 1))
    path = tmp_path / "r.yml"
    path.write_text(f"""
merge_method: llm_merging.task_arithmetic
base_model: {base}
slices:
  - sources:
      - model: {e0}
        layer_range: [0, 1]
        parameters: {{weights: 0.1}}
      - model: {e1}
        layer_range: [0, 1]
    parameters: {{weights: 0.2}}
  - sources:
      - model: {e0}
        layer_range: [1, 2]
      - model: {e1}
        layer_range: [1, 2]
parameters:
  weights: 0.4
  scale: [1.0, 3.0]
""")
    from llm_merging.merging.recipe import apply_recipe
    from llm_merging.merging.factory import instantiate

    r = load_recipe(path)
    m = instantiate(r.method)
    apply_recipe(m, r)
    m.layout = settings.Layout(["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"], r.slice_lengths)
    h0 = m.resolve_hparams("model.layers.0.mlp.up_proj.weight")
    h1 = m.resolve_hparams("model.layers.1.mlp.up_proj.weight")
    assert h0["weights"] == [0.1, 0.2]  # source > slice
    assert h1["weights"] == [0.4, 0.4]  # global where the slice sets nothing
    assert h0["scale"] == pytest.approx(3.0) and h1["scale"] == pytest.approx(3.0)  # 1-layer slices: t = 1


def test_model_level_over_global_and_filter_falls_back(tmp_path):
    base, e0, e1 = str(tiny.base_dir("decoder")), str(tiny.full_expert_dir("decoder", 0)), str(tiny.full_expert_dir("decoder", 1))
    path = tmp_path / "r.yml"
    path.write_text(f"""
merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters:
      weight: 0.7
      density: [{{filter: mlp, value: 0.9}}]
  - model: {e1}
parameters:
  weight: 0.3
  density: 0.5
""")
    from llm_merging.merging.recipe import apply_recipe
    from llm_merging.merging.factory import instantiate

    r = load_recipe(path)
    m = instantiate(r.method)
    apply_recipe(m, r)
    assert r.method == "ties_merge"
    h = m.resolve_hparams("model.layers.0.mlp.up_proj.weight")
    assert h["weights"] == [0.7, 0.3] and h["density"] == [0.9, 0.5]
    h = m.resolve_hparams("model.layers.0.self_attn.q_proj.weight")
    assert h["density"] == [0.5, 0.5]  # the model's filter does not match: the global value
    assert h["weighted_sign"] is True and h["divisor"] == "weight_sum"  # mergekit's TIES conventions


def test_param_validates_every_anchor_and_filter_value():
    with pytest.raises(ConfigError, match="density"):
        DENSITY.validate("density", settings.Gradient((1.0, 1.5)))
    with pytest.raises(ConfigError, match="density"):
        DENSITY.validate("density", [0.5, settings.from_yaml([{"filter": "mlp", "value": 0.0}, {"value": 0.5}], "d")])
    with pytest.raises(ConfigError, match="integer"):
        Param(3, "n", kind=int).validate("n", settings.Gradient((1, 5)))
    assert DENSITY.validate("density", settings.Gradient((1, 0.5))) == settings.Gradient((1.0, 0.5))


def test_cli_syntax_for_gradients_and_filters():
    assert DENSITY.parse("density", "{gradient: [1, 0.5, 0.1]}") == settings.Gradient((1, 0.5, 0.1))
    f = DENSITY.parse("density", "[{filter: mlp, value: 0.5}, {value: [1, 0.2]}]")
    assert f == settings.Filtered((("mlp", 0.5), (None, settings.Gradient((1, 0.2)))))
    per = DENSITY.parse("density", "[{gradient: [1, 0]}, 0.3]")
    assert per == [settings.Gradient((1, 0)), 0.3]
    assert DENSITY.parse("density", "0.7,0.3") == [0.7, 0.3]
    with pytest.raises(ConfigError, match="--set density"):
        DENSITY.parse("density", "{gradient: 3}")


# ------------------------------------------------------------------ end to end
def _run(capsys, out, *args):
    code = main(["--output_folder", str(out), "--quiet", "--no-eval", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def _tensors(d):
    return load_file(str(d / "merged_model" / "model.safetensors"))


@pytest.fixture(scope="module")
def models():
    return str(tiny.base_dir("decoder")), [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]


def test_recipe_equals_cli_flags_and_recipe_yml_round_trips_byte_for_byte(capsys, tmp_path, models):
    base, experts = models
    density = "[{filter: mlp, value: [1, 0.2]}, {value: 0.4}]"
    code, err = _run(capsys, tmp_path / "cli", "-m", "ties_merge", "--base-model", base, "--models", *experts,
                     "--set", f"density={density}", "weights=0.7,0.3", "--seed", "3")
    assert code == 0, err
    cli_dir = tmp_path / "cli" / "ties_merge"
    recipe_text = (cli_dir / "recipe.yml").read_text()
    assert "merge_method: ties_merge" in recipe_text and "seed: 3" in recipe_text
    code, err = _run(capsys, tmp_path / "again", "--recipe", str(cli_dir / "recipe.yml"))
    assert code == 0, err
    again = tmp_path / "again" / "ties_merge"
    assert (again / "recipe.yml").read_text() == recipe_text
    assert (again / "merged_model" / "model.safetensors").read_bytes() == (cli_dir / "merged_model" / "model.safetensors").read_bytes()
    # the per-tensor values really differ between MLP layers 0 and 1
    a, b = _tensors(cli_dir), _tensors(again)
    base_t = load_file(str(next((tiny.base_dir("decoder")).glob("*.safetensors"))))
    up0 = "model.layers.0.mlp.up_proj.weight"
    up1 = "model.layers.1.mlp.up_proj.weight"
    changed0 = (a[up0] != base_t[up0]).float().mean().item()
    changed1 = (a[up1] != base_t[up1]).float().mean().item()
    # density 1 at the first layer; 0.2 per expert at the last (two experts: at most 40 % of entries)
    assert changed0 > 0.9 and changed1 < 0.45
    assert torch.equal(a[up0], b[up0])


def test_mergekit_ties_recipe_against_formula(capsys, tmp_path, models):
    base, experts = models
    path = tmp_path / "ties.yml"
    path.write_text(f"""
merge_method: ties
base_model: {base}
models:
  - model: {experts[0]}
    parameters: {{weight: 0.6}}
  - model: {experts[1]}
    parameters: {{weight: 0.4}}
parameters: {{density: 1.0, int8_mask: true}}
dtype: float32
""")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 0, err
    merged = _tensors(tmp_path / "out" / "ties_merge")
    b = load_file(str(next(tiny.base_dir("decoder").glob("*.safetensors"))))
    e = [load_file(str(next(tiny.full_expert_dir("decoder", i).glob("*.safetensors")))) for i in range(2)]
    name = "model.layers.1.self_attn.v_proj.weight"
    d = torch.stack([x[name].double() - b[name].double() for x in e])
    w = torch.tensor([0.6, 0.4], dtype=torch.float64).view(2, 1, 1)
    wd = d * w
    sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(wd) == sign).double()
    den = (w * agree).sum(0)
    den[den == 0] = 1
    want = b[name].double() + (wd * agree).sum(0) / den
    assert torch.allclose(merged[name].double(), want, rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "out" / "ties_merge" / "report.json").read_text())
    assert report["recipe"]["merge_method"] == "ties"


@pytest.mark.parametrize("body, message", [
    ("merge_method: ties\nbase_model: BASE\nmodels: [EXPERT]\nfoo: 1\n", "foo: unknown key"),
    ("merge_method: ties\nbase_model: BASE\nmodels:\n  - model: EXPERT\n    paramters: {weight: 1}\n", "paramters: unknown key"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [EXPERT]\nparameters: {dencity: 0.5}\n", "dencity: unknown parameter"),
    ("merge_method: tie\nbase_model: BASE\nmodels: [EXPERT]\n", "did you mean ties"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [EXPERT]\nparameters: {density: [1, 1.5]}\n", "density"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [EXPERT]\nparameters: {density: [1\n", "not valid YAML"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [/no/such/model]\n", "/no/such/model"),
    ("merge_method: ties\nbase_model: BASE\nslices:\n  - sources:\n      - model: EXPERT\n        layer_range: [0, 40]\n",
     "slices hold 40 layers"),
    ("merge_method: ties\nmodels: [EXPERT]\n", "base_model"),
    ("merge_method: ties\nbase_model: BASE\nmodels: [EXPERT]\n1: x\nfoo: y\n", ": 1: unknown key"),  # keys of 2 types
    ("merge_method: ties\nbase_model: BASE\nmodels:\n  - {model: EXPERT, 2: y, z: 1}\n", "models[0].2: unknown key"),
])
def test_bad_recipes_are_one_line_errors_with_nothing_written(capsys, tmp_path, models, body, message):
    base, experts = models
    path = tmp_path / "bad.yml"
    path.write_text(body.replace("BASE", base).replace("EXPERT", experts[0]))
    out = tmp_path / "out"
    code, err = _run(capsys, out, "--recipe", str(path))
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True


@pytest.mark.parametrize("body, message", [
    ("merge_method: ties\nbase_model: b\nmodels: [e]\n1: x\nnull: y\nfoo: z\n", r"recipe .*: 1: unknown key \(known: "),
    ("merge_method: ties\nbase_model: b\nmodels: [e]\nllm_merging: {3: 1}\n", r": llm_merging\.3: unknown key"),
    ("- merge_method: ties\n", r": top level: expected a mapping, got list"),
    ("", r": expected a mapping at the top level, got an empty file"),
    ("merge_method: ties\nbase_model: b\nmodels: [e]\n---\nmerge_method: ties\n", r": 2 YAML documents"),
])
def test_load_recipe_checks_keys_of_any_type_in_one_line(tmp_path, body, message):
    path = tmp_path / "r.yml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_mergekit_needs_base_agrees_with_our_base_optional():
    """Two declarations of "merges without a base model": mergekit's (``MergekitMethod.needs_base``) and the
    method class's (``Merges.base_optional``); a recipe reads the class's."""
    from llm_merging.merging import get_method_class
    from llm_merging.merging.mergekit_names import MERGEKIT_METHODS

    differ = {name: (mk.needs_base, get_method_class(mk.ours).base_optional)
              for name, mk in MERGEKIT_METHODS.items() if mk.needs_base == get_method_class(mk.ours).base_optional}
    assert not differ, f"needs_base == base_optional for {differ}"
    assert {n for n, mk in MERGEKIT_METHODS.items() if not mk.needs_base} >= {"linear", "passthrough", "karcher"}


def test_passthrough_slices_stack_layers_into_a_loadable_model(capsys, tmp_path, models):
    from transformers import AutoModelForCausalLM

    _, experts = models
    path = tmp_path / "pt.yml"
    path.write_text(f"""
merge_method: passthrough
slices:
  - sources:
      - model: {experts[0]}
        layer_range: [0, 2]
  - sources:
      - model: {experts[1]}
        layer_range: [1, 2]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
""")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "passthrough" / "merged_model"))
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    sd = model.state_dict()
    a, b = (load_file(str(next(tiny.full_expert_dir("decoder", i).glob("*.safetensors")))) for i in range(2))
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], a["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.allclose(sd["model.layers.2.self_attn.o_proj.weight"], 0.5 * b["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's model
    assert torch.equal(sd["model.norm.weight"], b["model.norm.weight"])  # last slice's model


def test_passthrough_layer_range_beyond_the_model_is_one_line(capsys, tmp_path, models):
    _, experts = models
    path = tmp_path / "pt.yml"
    path.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {experts[0]}\n        layer_range: [1, 5]\n")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 2 and len(err) == 1 and "goes beyond model" in err[0], err
    assert not (tmp_path / "out" / "passthrough" / "merged_model").exists()


def test_out_dtype_sets_the_saved_dtype(capsys, tmp_path, models):
    base, experts = models
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                    f"  - model: {experts[0]}\n    parameters: {{weight: 1.0}}\ndtype: float32\nout_dtype: bfloat16\n")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 0, err
    merged = _tensors(tmp_path / "out" / "task_arithmetic")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    e = load_file(str(next(tiny.full_expert_dir("decoder", 0).glob("*.safetensors"))))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(merged[name], e[name].to(torch.bfloat16))  # weight 1: the expert, then cast


def test_cli_run_that_is_a_mergekit_merge_writes_mergekit_vocabulary(capsys, tmp_path, models):
    base, experts = models
    code, err = _run(capsys, tmp_path / "cli", "-m", "task_arithmetic", "--base-model", base, "--models", *experts,
                     "--set", "weights=0.7,0.3", "scale=0.9")
    assert code == 0, err
    d = tmp_path / "cli" / "task_arithmetic"
    import yaml

    doc = yaml.safe_load((d / "recipe.yml").read_text())
    assert doc["merge_method"] == "task_arithmetic" and doc["parameters"]["lambda"] == 0.9
    assert [m["parameters"]["weight"] for m in doc["models"]] == [0.7, 0.3]
    code, err = _run(capsys, tmp_path / "again", "--recipe", str(d / "recipe.yml"))
    assert code == 0, err
    again = tmp_path / "again" / "task_arithmetic"
    assert (again / "merged_model" / "model.safetensors").read_bytes() == (d / "merged_model" / "model.safetensors").read_bytes()
    # our TIES defaults (count divisor, unweighted election) are not mergekit's ties: our vocabulary
    code, err = _run(capsys, tmp_path / "ties", "-m", "ties_merge", "--base-model", base, "--models", *experts)
    assert code == 0, err
    assert yaml.safe_load((tmp_path / "ties" / "ties_merge" / "recipe.yml").read_text())["merge_method"] == "ties_merge"


def test_recipe_with_set_and_dtype_overrides_writes_a_recipe_yml_that_reproduces_it(capsys, tmp_path, models):
    base, experts = models
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                    f"  - model: {experts[0]}\n    parameters: {{weight: [0.0, 1.0]}}\n"
                    f"  - model: {experts[1]}\n    parameters: {{weight: [{{filter: mlp, value: 0.5}}]}}\n"
                    "parameters: {weight: 0.9}\ndtype: float32\n")
    code, err = _run(capsys, tmp_path / "a", "--recipe", str(path), "--set", "scale=0.5", "--dtype", "bfloat16")
    assert code == 0, err
    d = tmp_path / "a" / "task_arithmetic"
    code, err = _run(capsys, tmp_path / "b", "--recipe", str(d / "recipe.yml"))
    assert code == 0, err
    again = tmp_path / "b" / "task_arithmetic" / "merged_model" / "model.safetensors"
    assert again.read_bytes() == (d / "merged_model" / "model.safetensors").read_bytes()


def test_passthrough_of_base_plus_lora_without_base_model_applies_the_lora_to_its_base(capsys, tmp_path, models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, _ = models
    lora = str(tiny.lora_expert_dir("decoder", 1))
    path = tmp_path / "pt.yml"
    path.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}+{lora}\n"
                    "        layer_range: [0, 2]\n")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "passthrough" / "merged_model" / "model.safetensors"))
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload().state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(got[name], want[name], atol=1e-6)


def test_mergekit_weight_missing_for_a_model_is_a_one_line_error(capsys, tmp_path, models):
    base, experts = models
    path = tmp_path / "r.yml"
    path.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {experts[0]}\n"
                    f"    parameters: {{weight: 0.5}}\n  - model: {experts[1]}\n")
    code, err = _run(capsys, tmp_path / "out", "--recipe", str(path))
    assert code == 2 and len(err) == 1 and "parameters.weight: missing" in err[0]


def test_cli_filter_list_may_have_spaces():
    assert settings.parse_cli("[ {filter: mlp, value: 0.3}, {value: 0.7}]", "t") == settings.Filtered((("mlp", 0.3), (None, 0.7)))
