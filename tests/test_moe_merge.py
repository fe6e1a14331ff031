"""Merging full fine-tunes of one mixture-of-experts model (Mixtral, Qwen3-MoE, gpt-oss).

Transformers 5 holds each layer's experts fused (``mlp.experts.gate_up_proj`` of shape (E, 2I, H),
``mlp.experts.down_proj`` (E, H, I)); Hub checkpoints store one tensor per expert and projection
(``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.gate_proj.weight``). The checkpoints here are
written both ways: the per-expert layout by this file's own splitting (``hub_state``, checked against
``save_pretrained``'s default output), the fused layout by ``save_pretrained(save_original_format=False)``.
Every merge is checked against an independent per-expert computation on the split tensors.
"""
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_merging import ops
from llm_merging.core.errors import CheckpointError, ConfigError
from llm_merging.merging import get_method_class, method_targets, settings
from llm_merging.merging.base import param_seed
from llm_merging.model.checkpoint import FullExpert, saved_layout
from llm_merging.model.engine import (
    base_param_shapes,
    merge_in_parts,
    merge_parts,
    tensor_aliases,
)
from llm_merging.model.save import StreamingSave, save_full
from llm_merging.search.candidates import InMemoryMerger

transformers = pytest.importorskip("transformers")

FAMILIES = ("mixtral", "qwen3_moe")
N_EXPERTS = 4
_FUSED = re.compile(r"^(.*\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _config(family: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False,
                  max_position_embeddings=64)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=N_EXPERTS, **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=N_EXPERTS, moe_intermediate_size=40, head_dim=8, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=N_EXPERTS, moe_intermediate_size=40,
                                           shared_expert_intermediate_size=24, **common)
    return transformers.GptOssConfig(num_local_experts=N_EXPERTS, head_dim=8,
                                     **{**common, "intermediate_size": 40})


def hub_state(state: dict, family: str) -> dict:
    """The in-memory (fused) state dict split into the tensors a Hub checkpoint of ``family`` stores:
    gate_up_proj[e] = [gate; up] (rows), down_proj[e] as it is; Mixtral's ``mlp`` is ``block_sparse_moe``
    and its projections w1 (gate), w3 (up), w2 (down)."""
    out = {}
    for key, value in state.items():
        m = _FUSED.match(key)
        if m is None:
            if family == "mixtral" and ".mlp.gate." in key:
                key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            out[key] = value
            continue
        layer, which = m.groups()
        for e in range(value.shape[0]):
            if family == "mixtral":
                names = {"gate": f"{layer}.block_sparse_moe.experts.{e}.w1.weight",
                         "up": f"{layer}.block_sparse_moe.experts.{e}.w3.weight",
                         "down": f"{layer}.block_sparse_moe.experts.{e}.w2.weight"}
            else:
                names = {k: f"{layer}.mlp.experts.{e}.{k}_proj.weight" for k in ("gate", "up", "down")}
            if which == "gate_up_proj":
                half = value.shape[1] // 2
                out[names["gate"]], out[names["up"]] = value[e, :half], value[e, half:]
            else:
                out[names["down"]] = value[e]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def write_checkpoint(model, path, family: str, layout: str) -> None:
    """``layout`` "hub": per-expert tensors written here; "fused": transformers' save without conversion."""
    if layout == "fused":
        model.save_pretrained(path, save_original_format=False)
        return
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    save_file(hub_state(model.state_dict(), family), str(path / "model.safetensors"), metadata={"format": "pt"})


def _models(family: str, n: int = 2):
    torch.manual_seed(0)
    config = _config(family)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    experts = []
    for i in range(n):
        m = transformers.AutoModelForCausalLM.from_config(config).eval()
        m.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(m)
    return base, experts


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request, tmp_path_factory):
    """A tiny MoE base and two full fine-tunes, each written in both layouts."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base, experts = _models(family)
    dirs = {}
    for name, model in [("base", base), ("e0", experts[0]), ("e1", experts[1])]:
        for layout in ("hub", "fused"):
            write_checkpoint(model, root / f"{name}-{layout}", family, layout)
            dirs[name, layout] = root / f"{name}-{layout}"
    return {"family": family, "base": base, "experts": experts, "dirs": dirs, "root": root}


def _method(name, base_dir, expert_dirs, values=None, seed=0):
    m = get_method_class(name)()
    m.base_model_name, m.base_model_revision_id = str(base_dir), None
    m.list_models, m.is_peft = [str(d) for d in expert_dirs], None
    m.device, m.progress, m.tokenizer_optional, m.seed = "cpu", False, True, seed
    m.set_hyperparameters(values or {})
    m.preflight()
    return m


def _fp(t):
    return t.detach().to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# layouts and names
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_hub_layout_is_transformers_save_format(tmp_path, family):
    """The per-expert split written here is exactly what save_pretrained writes (names and values), and
    saved_layout traces it from transformers' own conversion."""
    base, _ = _models(family, 0)
    base.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    ours = hub_state(base.state_dict(), family)
    assert set(saved) == set(ours)
    for k in ours:
        assert torch.equal(saved[k], ours[k]), k
    layout = saved_layout(base)
    state = base.state_dict()
    for name, parts in layout.items():
        flat = state[name].reshape(-1)
        for p in parts:
            assert torch.equal(flat[p.start:p.start + p.numel].view(p.shape), ours[p.name]), p.name


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_full_expert_reads_both_layouts(moe, layout):
    """FullExpert maps either layout onto the fused in-memory parameters, whole, by ranges and by parts."""
    base, expert = moe["base"], moe["experts"][0]
    e = FullExpert(moe["dirs"]["e0", layout])
    e.bind(base_param_shapes(base))
    assert e.param_names() == set(dict(base.named_parameters()))
    assert not e.missing_params and not e.unmatched_keys
    for name, p in base.named_parameters():
        want = _fp(expert.get_parameter(name))
        assert torch.equal(e.tensor(name, _fp(p)), want), name
        assert torch.equal(e.delta(name, _fp(p)), want - _fp(p)), name
        flat = want.reshape(-1)
        a, b = 3, flat.numel() - 5
        assert e.range_readable(name)
        assert torch.equal(e.read_range(name, a, b).float(), flat[a:b]), name
        assert torch.equal(e.part(name, a, b), flat[a:b]), name


def test_incomplete_per_expert_checkpoint_is_one_line_error(moe, tmp_path):
    state = load_file(str(moe["dirs"]["e0", "hub"] / "model.safetensors"))
    dropped = next(k for k in state if ".experts.2." in k)
    del state[dropped]
    moe["base"].config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    e = FullExpert(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(dropped)) as exc:
        e.bind(base_param_shapes(moe["base"]))
    assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------------
# merges against an independent per-expert computation
# --------------------------------------------------------------------------------------------------------
def _reference(moe, fn) -> dict:
    """θ₀ + fn(name, θ₀, τs) on every tensor of the per-expert (Hub) split, with the names the engine uses:
    the Hub names of the split expert matrices, the in-memory names of every other parameter."""
    family = moe["family"]
    base_state = {k: _fp(v) for k, v in moe["base"].state_dict().items()}
    expert_states = [{k: _fp(v) for k, v in e.state_dict().items()} for e in moe["experts"]]
    out = {}
    for name in base_state:
        if _FUSED.match(name):
            b = hub_state({name: base_state[name]}, family)
            es = [hub_state({name: s[name]}, family) for s in expert_states]
            for k in b:
                out[k] = b[k] + fn(k, b[k], [s[k] - b[k] for s in es])
        else:
            b = base_state[name]
            merged = b + fn(name, b, [s[name] - b for s in expert_states])
            out[hub_state({name: merged}, family).popitem()[0]] = merged
    return out


def _check(model, family, reference, atol=1e-6):
    got = hub_state({k: _fp(v) for k, v in model.state_dict().items()}, family)
    assert set(got) == set(reference)
    for k, want in reference.items():
        torch.testing.assert_close(got[k], want, atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


REPRESENTATIVE = {
    "task_arithmetic": ({"weights": [0.7, 0.3]}, lambda name, b, tvs, seed: 0.7 * tvs[0] + 0.3 * tvs[1]),
    "ties_merge": ({"density": 0.4}, lambda name, b, tvs, seed: ops.ties(tvs, density=0.4)),
    "dare_linear": ({"density": 0.6}, lambda name, b, tvs, seed: ops.dare(
        tvs, density=0.6, rescale="inverse", seed=param_seed(seed, name))),
    "slerp": ({"t": 0.3}, lambda name, b, tvs, seed: ops.slerp(tvs[0], tvs[1], 0.3)),
    "tsv_merge": ({}, lambda name, b, tvs, seed: ops.tsv(tvs)),
    "iso_c": ({}, lambda name, b, tvs, seed: ops.iso_c(tvs)),
}


@pytest.mark.parametrize("layouts", [("hub", "hub", "hub"), ("fused", "fused", "fused"), ("fused", "hub", "fused")],
                         ids="-".join)
@pytest.mark.parametrize("method", sorted(REPRESENTATIVE))
def test_merge_equals_per_expert_computation(moe, method, layouts):
    """Each layout, and bases and experts in different layouts: the merge equals the method's math applied
    to each expert matrix of the per-expert checkpoint (per-tensor top-k, SVDs, seeds by the Hub name)."""
    values, fn = REPRESENTATIVE[method]
    dirs = moe["dirs"]
    m = _method(method, dirs["base", layouts[0]], [dirs["e0", layouts[1]], dirs["e1", layouts[2]]], values, seed=7)
    model = m.merge()
    assert m.merge_stats["tensors_merged_per_expert"] == 2 * moe["base"].config.num_hidden_layers
    _check(model, moe["family"], _reference(moe, lambda n, b, tvs: fn(n, b, tvs, 7)))


def test_fused_merge_differs_from_whole_tensor_math(moe):
    """The per-expert split matters and the engine does it: its TIES result on a fused tensor is the per-expert
    one, not TIES on the whole fused tensor (one top-k over all experts), which is another result here."""
    name = "model.layers.0.mlp.experts.gate_up_proj"
    dirs = moe["dirs"]
    model = _method("ties_merge", dirs["base", "fused"], [dirs["e0", "fused"], dirs["e1", "fused"]],
                    {"density": 0.4}).merge()
    base = _fp(moe["base"].get_parameter(name))
    tvs = [_fp(e.get_parameter(name)) - base for e in moe["experts"]]
    whole = base + ops.ties(tvs, density=0.4)
    got = _fp(model.get_parameter(name))
    assert not torch.allclose(got, whole, atol=1e-6)
    half = base.shape[1] // 2  # gate and up projections of each expert are separate checkpoint matrices
    for e, rows in [(e, rows) for e in range(N_EXPERTS) for rows in (slice(0, half), slice(half, None))]:
        want = base[e, rows] + ops.ties([t[e, rows] for t in tvs], density=0.4)
        torch.testing.assert_close(got[e, rows], want, atol=1e-6, rtol=1e-5)


METHOD_VALUES = {"nearswap": {"t": 0.05}}  # values a method needs (no default)


def _engine_methods():
    out = []
    for name in sorted(method_targets()):
        cls = get_method_class(name)
        if cls.uses_engine() and not cls.needs_calibration:
            out.append(name)
    return out


@pytest.mark.parametrize("method", _engine_methods())
def test_every_method_merges_per_expert(moe, method):
    """Every registered engine method on a mixed-layout pair: each fused parameter equals the method's own
    per-tensor function applied to the per-expert matrices under their Hub names (what a merge of the
    unfused checkpoint computes), every other parameter its whole-tensor result."""
    cls = get_method_class(method)
    low, high = cls.expert_count
    n = max(low, min(2, high or 2))
    dirs = moe["dirs"]
    experts = [dirs["e0", "hub"], dirs["e1", "fused"]][:n]
    if method == "knots_ties":  # LoRA adapters only: refused before any weight is loaded
        with pytest.raises(ConfigError, match="LoRA adapters only"):
            _method(method, dirs["base", "hub"], experts)
        return
    m = _method(method, dirs["base", "hub"], experts, METHOD_VALUES.get(method), seed=3)
    model = m.merge()
    moe_sub = {**moe, "experts": moe["experts"][:n]}
    reference = _reference(moe_sub, lambda name, b, tvs: m.merge_resolved(name, b.clone(), [t.clone() for t in tvs]))
    _check(model, moe["family"], reference, atol=1e-5)



# --------------------------------------------------------------------------------------------------------
# recipes: filters on per-expert and in-memory names
# --------------------------------------------------------------------------------------------------------
def test_filters_match_hub_and_in_memory_names(moe):
    """``experts.3`` picks one expert's matrices; ``mlp.gate`` the router; for Mixtral the on-disk names
    (``block_sparse_moe``, ``w1``) work as mergekit's filters do, and the in-memory ``gate_up_proj``."""
    family = moe["family"]
    dirs = moe["dirs"]
    up = "w3" if family == "mixtral" else "up_proj"
    scale = [{"filter": "experts.3", "value": 0.0}, {"filter": "mlp.gate", "value": 0.5},
             {"filter": "gate_up_proj", "value": 2.0}, {"filter": up, "value": 3.0}, {"value": 1.0}]
    m = _method("task_arithmetic", dirs["base", "fused"], [dirs["e0", "hub"], dirs["e1", "hub"]],
                {"scale": settings.from_yaml(scale, "scale")})
    model = m.merge()

    def lam(name, aliases):
        names = (name, *aliases)
        if any("experts.3" in n for n in names):
            return 0.0
        if any("mlp.gate" in n for n in names):
            return 0.5
        if any("gate_up_proj" in n for n in names):
            return 2.0
        if any(up in n for n in names):
            return 3.0
        return 1.0

    aliases = tensor_aliases(moe["base"])
    reference = _reference(moe, lambda name, b, tvs: lam(name, aliases.get(name, ())) * (tvs[0] + tvs[1]))
    _check(model, family, reference)
    # the fused gate_up parts are scaled 2 (their in-memory name), down parts 1, expert 3 not at all
    assert any("experts.3" in k for k in aliases)
    if family == "mixtral":
        assert aliases["model.layers.0.mlp.gate.weight"] == ("model.layers.0.block_sparse_moe.gate.weight",)
        assert aliases["model.layers.0.block_sparse_moe.experts.1.w1.weight"] == (
            "model.layers.0.mlp.experts.gate_up_proj",)


def test_recipe_filter_on_moe(moe, tmp_path):
    """A mergekit recipe with per-expert filters runs on fused in-memory tensors."""
    from llm_merging.merging.factory import instantiate
    from llm_merging.merging.recipe import apply_recipe, load_recipe

    dirs = moe["dirs"]
    path = tmp_path / "moe.yml"
    path.write_text(
        f"merge_method: ties\nbase_model: {dirs['base', 'hub']}\nmodels:\n"
        f"  - model: {dirs['e0', 'hub']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {dirs['e1', 'fused']}\n    parameters: {{weight: 1.0}}\n"
        "parameters:\n  density:\n    - filter: experts.0.\n      value: 1.0\n    - value: 0.3\n", encoding="utf-8")
    recipe = load_recipe(path)
    m = instantiate(recipe.method)
    apply_recipe(m, recipe)
    m.device, m.progress, m.tokenizer_optional = "cpu", False, True
    m.preflight()
    model = m.merge()
    reference = _reference(moe, lambda name, b, tvs: m.merge_resolved(name, b.clone(), [t.clone() for t in tvs]))
    _check(model, moe["family"], reference, atol=1e-5)
    for name in reference:  # the filter picks expert 0's matrices only, by their per-expert names
        d = m.resolve_hparams(name, 2)["density"]
        d = list(d) if isinstance(d, (list, tuple)) else [d, d]
        assert d == ([1.0, 1.0] if ".experts.0." in name else [0.3, 0.3]), name
    assert sum(".experts.0." in n for n in reference) == 3 * moe["base"].config.num_hidden_layers


# --------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------
def _load_back(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return model


@pytest.mark.parametrize("layouts", [("hub", "fused"), ("fused", "hub")], ids="-".join)
def test_streaming_save_writes_transformers_format(moe, tmp_path, layouts):
    """--no-eval --save full: the merge is written tensor by tensor in the layout save_pretrained writes
    (per-expert tensors for a base loaded from a per-expert checkpoint, fused ones for a fused base); the
    directory loads back with no missing or unexpected key and equals the merge held in memory, and
    save_pretrained's own file (same bytes)."""
    dirs = moe["dirs"]
    args = (dirs["base", layouts[0]], [dirs["e0", layouts[1]], dirs["e1", "hub"]], {"density": 0.5})
    streamed = _method("ties_merge", *args)
    streamed.save_while_merging = lambda model: StreamingSave(model, tmp_path / "streamed")
    streamed.merge()
    assert streamed.merged_model is None and streamed.stream_writer is not None
    streamed.stream_writer.finish(None)
    in_memory = _method("ties_merge", *args).merge()
    save_full(in_memory, None, tmp_path / "whole")
    on_disk = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert set(on_disk) == set(load_file(str(tmp_path / "whole" / "model.safetensors")))
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()
    if layouts[0] == "hub":  # save_pretrained writes the layout the base was loaded from
        assert any(".experts.3." in k for k in on_disk) and not any(k.endswith("gate_up_proj") for k in on_disk)
    else:
        assert not any(".experts.3." in k for k in on_disk) and any(k.endswith("gate_up_proj") for k in on_disk)
    loaded = _load_back(tmp_path / "streamed")
    for name, p in in_memory.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_cli_save_full_and_kit_save(moe, tmp_path):
    """The command line's --save full (streamed under --no-eval) and the kit's save_model."""
    from llm_merging.main import main

    dirs = moe["dirs"]
    out = tmp_path / "out"
    status = main(["-m", "dare_ties", "--base-model", str(dirs["base", "fused"]), "--models",
                   str(dirs["e0", "hub"]), str(dirs["e1", "fused"]), "--no-eval", "--save", "full",
                   "--device", "cpu", "--output_folder", str(out), "--seed", "5", "--set", "density=0.7"])
    assert status == 0
    report = json.loads((out / "dare_ties" / "report.json").read_text(encoding="utf-8"))
    merged = _load_back(out / "dare_ties" / "merged_model")
    m = _method("dare_ties", dirs["base", "hub"], [dirs["e0", "fused"], dirs["e1", "hub"]], {"density": 0.7}, seed=5)
    model = m.merge()
    for name, p in model.state_dict().items():
        assert torch.equal(merged.state_dict()[name], p), name
    assert report is not None
    m.save_model(str(tmp_path))  # the kit's safetensor.pt: the in-memory state dict
    kit = load_file(str(tmp_path / "safetensor.pt"))
    fresh = transformers.AutoModelForCausalLM.from_config(moe["base"].config)
    fresh.load_state_dict(kit)
    for name, p in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], p), name


# --------------------------------------------------------------------------------------------------------
# gpt-oss: experts fused on disk too, split per expert for the merge
# --------------------------------------------------------------------------------------------------------
def test_gpt_oss_experts_merged_per_expert(tmp_path):
    pytest.importorskip("transformers.models.gpt_oss")
    base, experts = _models("gpt_oss")
    for name, model in [("base", base), ("e0", experts[0]), ("e1", experts[1])]:
        model.save_pretrained(tmp_path / name)
    parts = merge_parts(base)
    assert set(parts) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                          for p in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    m = _method("ties_merge", tmp_path / "base", [tmp_path / "e0", tmp_path / "e1"], {"density": 0.3})
    model = m.merge()
    for name, p in model.named_parameters():
        b = _fp(base.get_parameter(name))
        tvs = [_fp(e.get_parameter(name)) - b for e in experts]
        if name in parts:
            want = b + torch.stack([ops.ties([t[e] for t in tvs], density=0.3) for e in range(N_EXPERTS)])
        else:
            want = b + ops.ties(tvs, density=0.3)
        torch.testing.assert_close(_fp(p), want, atol=1e-6, rtol=1e-5, msg=lambda s, name=name: f"{name}: {s}")


def test_qwen2_moe_both_layouts(tmp_path):
    """Qwen2-MoE (shared expert beside the routed ones): both layouts read, TIES per expert matrix."""
    base, experts = _models("qwen2_moe")
    dirs = {}
    for name, model, layout in [("base", base, "fused"), ("e0", experts[0], "hub"), ("e1", experts[1], "fused")]:
        write_checkpoint(model, tmp_path / name, "qwen2_moe", layout)
        dirs[name] = tmp_path / name
    m = _method("ties_merge", dirs["base"], [dirs["e0"], dirs["e1"]], {"density": 0.4})
    model = m.merge()
    moe = {"family": "qwen2_moe", "base": base, "experts": experts}
    _check(model, "qwen2_moe", _reference(moe, lambda name, b, tvs: ops.ties(tvs, density=0.4)))


def test_passthrough_copies_moe_expert(moe):
    dirs = moe["dirs"]
    for layout in ("hub", "fused"):
        model = _method("passthrough", dirs["base", "fused"], [dirs["e0", layout]]).merge()
        for name, p in moe["experts"][0].state_dict().items():
            assert torch.equal(model.state_dict()[name], p), name


@pytest.mark.parametrize("op, kwargs", [(ops.star, {"eta": 40.0}), (ops.cart, {"rank_ratio": 0.3}), (ops.tsv, {}),
                                        (ops.iso_c, {}), (ops.iso_cts, {"common_space_fraction": 0.5})])
def test_matrix_ops_treat_stacked_experts_per_matrix(op, kwargs):
    """A 3-D task vector (E, m, n) is E matrices: each gets its own spectrum, as on the unfused checkpoint."""
    g = torch.Generator().manual_seed(0)
    tvs = [torch.randn(N_EXPERTS, 12, 8, generator=g) for _ in range(3)]
    got = op(tvs, **kwargs)
    want = torch.stack([op([t[e] for t in tvs], **kwargs) for e in range(N_EXPERTS)])
    assert torch.equal(got, want)
    flat = op([t.reshape(N_EXPERTS * 12, 8) for t in tvs], **kwargs).view(N_EXPERTS, 12, 8)
    assert not torch.allclose(got, flat)  # one matrix of all experts would be another result


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_methods_merge_moe(tmp_path, method):
    """Data-aware methods keep their statistics per parameter: fused expert tensors are merged whole
    (RegMean: by its data-free fallback, task arithmetic; Fisher: weighted by each expert's Fisher)."""
    from llm_merging.model import tiny

    tok = tiny.build_tokenizer(tmp_path / "tok")
    config = _config("mixtral")
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    dirs = [tmp_path / "base", tmp_path / "e0", tmp_path / "e1"]
    models = [base]
    for i in range(2):
        m = transformers.AutoModelForCausalLM.from_config(config)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        models.append(m)
    for d, m, layout in zip(dirs, models, ("hub", "hub", "fused")):
        write_checkpoint(m, d, "mixtral", layout)
        tok.save_pretrained(d)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\na quick brown fox\nnumbers one two three\n", encoding="utf-8")
    m = get_method_class(method)()
    m.base_model_name, m.base_model_revision_id = str(dirs[0]), None
    m.list_models, m.is_peft, m.device, m.progress = [str(d) for d in dirs[1:]], None, "cpu", False
    m.calibration_files = [str(prompts)]
    m.set_hyperparameters({})
    m.preflight()
    merged = m.merge()
    assert "tensors_merged_per_expert" not in m.merge_stats
    name = "model.layers.0.mlp.experts.gate_up_proj"
    got = _fp(merged.get_parameter(name))
    assert torch.isfinite(got).all()
    if method == "regmean":
        b = _fp(base.get_parameter(name))
        want = b + sum(_fp(e.get_parameter(name)) - b for e in models[1:])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_merge_in_parts_equals_engine(moe):
    """merge_in_parts (whole tensors in memory, e.g. a search's candidates) gives the engine's per-expert merge."""
    dirs = moe["dirs"]
    m = _method("tsv_merge", dirs["base", "hub"], [dirs["e0", "hub"], dirs["e1", "fused"]])
    model = m.merge()
    parts = merge_parts(moe["base"])
    for name, p in model.named_parameters():
        b = _fp(moe["base"].get_parameter(name))
        tvs = [_fp(e.get_parameter(name)) - b for e in moe["experts"]]
        got = b + merge_in_parts(m.merge_resolved, name, b, tvs, parts.get(name))
        torch.testing.assert_close(_fp(p), got, atol=1e-6, rtol=1e-5, msg=lambda s, name=name: f"{name}: {s}")


def test_per_expert_bin_checkpoint(moe, tmp_path):
    """A per-expert checkpoint in pytorch_model.bin (no ranges): read part by part, same merge."""
    expert = moe["experts"][0]
    expert.config.save_pretrained(tmp_path)
    torch.save(hub_state(expert.state_dict(), moe["family"]), tmp_path / "pytorch_model.bin")
    dirs = moe["dirs"]
    m = _method("ties_merge", dirs["base", "hub"], [tmp_path, dirs["e1", "fused"]], {"density": 0.4})
    _check(m.merge(), moe["family"], _reference(moe, lambda name, b, tvs: ops.ties(tvs, density=0.4)))


def test_lora_on_expert_parameters_with_full_moe_expert(moe, tmp_path):
    """A PEFT LoRA on the fused expert tensors (target_parameters) merged with a per-expert full fine-tune:
    the LoRA's ΔW (PEFT's merge_and_unload) and the full expert's τ are TIES-merged per expert matrix."""
    peft = pytest.importorskip("peft")
    dirs = moe["dirs"]
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["base", "hub"])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    lora = peft.get_peft_model(model, config)
    lora.save_pretrained(tmp_path / "lora")
    with torch.no_grad():
        lora_merged = {k: _fp(v) for k, v in lora.merge_and_unload().state_dict().items()}
    m = _method("ties_merge", dirs["base", "fused"], [tmp_path / "lora", dirs["e0", "hub"]], {"density": 0.5})
    merged = m.merge()
    family = moe["family"]
    base_state = {k: _fp(v) for k, v in moe["base"].state_dict().items()}
    lora_hub = hub_state(lora_merged, family)
    full_hub = hub_state({k: _fp(v) for k, v in moe["experts"][0].state_dict().items()}, family)
    base_hub = hub_state(base_state, family)
    got = hub_state({k: _fp(v) for k, v in merged.state_dict().items()}, family)
    for k, b in base_hub.items():
        tl, tf = lora_hub[k] - b, full_hub[k] - b
        want = b + ops.ties([tl, tf], density=0.5)  # τ of the LoRA is 0 where it changes nothing
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


def test_search_candidate_equals_final_merge(moe):
    """A search's in-memory candidate merges fused expert tensors per expert matrix, as the final merge does."""
    dirs = moe["dirs"]
    final = _method("tsv_merge", dirs["base", "hub"], [dirs["e0", "hub"], dirs["e1", "fused"]]).merge()
    searched = _method("tsv_merge", dirs["base", "hub"], [dirs["e0", "hub"], dirs["e1", "fused"]])
    searched._load_tokenizer = lambda: None  # these tiny checkpoints carry no tokenizer (none is needed here)
    merger = InMemoryMerger(searched, progress=False)
    merger.apply(searched.merge_resolved)
    for name, p in final.named_parameters():
        torch.testing.assert_close(_fp(merger.model.get_parameter(name)), _fp(p), atol=1e-6, rtol=1e-5,
                                   msg=lambda s, name=name: f"{name}: {s}")


def test_save_adapter_of_moe_full_experts_refused_in_preflight(moe, tmp_path, capsys):
    """--save adapter cannot hold fused 3-D expert tensors: one line before any weight, nothing written."""
    from llm_merging.main import main

    dirs = moe["dirs"]
    out = tmp_path / "out"
    status = main(["-m", "task_arithmetic", "--base-model", str(dirs["base", "hub"]), "--models",
                   str(dirs["e0", "hub"]), str(dirs["e1", "fused"]), "--no-eval", "--save", "adapter",
                   "--adapter-rank", "4", "--device", "cpu", "--output_folder", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "--save adapter" in err[0] and "mlp.experts." in err[0] and "--save full" in err[0], err[0]
    assert not (out / "task_arithmetic" / "adapter").exists()
