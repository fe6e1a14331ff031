"""LoRA task vectors: exactness against PEFT's own merge_and_unload, real adapters, error cases."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llm_merging.core.errors import AdapterError  # noqa: E402
from llm_merging.model.lora import LoraAdapter, get_pattern_key, is_adapter_dir  # noqa: E402

REAL = Path("/work/shared/data/real_adapters/gpt2")


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def make_adapter(model, config, out: Path, *, safe=True, seed=1, mutate_base=None, merge=True):
    """Wrap ``model`` with ``config``, randomise every adapter tensor, save it; return (base sd, merged sd)."""
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n or "trainable_tokens" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        if mutate_base is not None:
            mutate_base(pm, g)
    pm.save_pretrained(str(out), safe_serialization=safe)
    if not merge:
        return base_sd, None
    merged = pm.merge_and_unload()
    merged_sd = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return base_sd, merged_sd


def check_exact(adapter: LoraAdapter, base_sd: dict, merged_sd: dict, rename=lambda k: k, atol=1e-6):
    """base + delta == PEFT-merged weights for every parameter; returns the names that changed."""
    adapter.bind({rename(k): tuple(v.shape) for k, v in base_sd.items()})
    changed = set()
    for k, b in base_sd.items():
        d = adapter.delta(rename(k), b)
        if d is None:
            got = b
        else:
            assert d.dtype == torch.float32 and d.shape == b.shape and d.device == b.device
            got = b.float() + d
            changed.add(k)
        torch.testing.assert_close(got, merged_sd[k].float(), atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    # exactly the parameters PEFT changed (a replacement equal to the base may count as changed)
    really = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert really <= changed
    assert {rename(k) for k in changed} == adapter.param_names()
    return changed


def check_factors(adapter: LoraAdapter, base_sd: dict):
    n = 0
    for k, b in base_sd.items():
        f = adapter.factors(k)
        if f is None:
            continue
        if k in adapter.replacements:
            continue
        bs, a = f
        torch.testing.assert_close((bs @ a).reshape(b.shape), adapter.delta(k, b), atol=1e-6, rtol=1e-5)
        n += 1
    assert n > 0


# ------------------------------------------------------------------------------------------------------
# exactness against PEFT
# ------------------------------------------------------------------------------------------------------
def test_plain_lora_llama(tmp_path):
    base, merged = make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                tmp_path / "a")
    assert is_adapter_dir(tmp_path / "a") and not is_adapter_dir(tmp_path)
    ad = LoraAdapter.load(tmp_path / "a")
    assert ad.name == "a"
    assert "model.layers.0.self_attn.q_proj" in ad.module_names()
    assert len(ad.module_names()) == 4
    changed = check_exact(ad, base, merged)
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    check_factors(ad, base)
    assert ad.delta("model.layers.0.mlp.up_proj.weight", base["model.layers.0.mlp.up_proj.weight"]) is None


def test_rslora(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=16, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, base, merged)
    lo = ad._loras["model.layers.0.self_attn.q_proj"]
    assert lo.scale == pytest.approx(16 / 2.0)


def test_rank_and_alpha_pattern(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                     rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6, r"layers\.0\.mlp\.up_proj": 3},
                     alpha_pattern={"down_proj": 3, "model.layers.1.mlp.up_proj": 11})
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    ranks = {m: lo.r for m, lo in ad._loras.items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.self_attn.v_proj"] == 6
    assert ranks["model.layers.0.self_attn.v_proj"] == 4
    assert ranks["model.layers.0.mlp.up_proj"] == 3
    assert ad._loras["model.layers.1.mlp.up_proj"].alpha == 11
    assert ad._loras["model.layers.0.mlp.down_proj"].alpha == 3
    check_exact(ad, base, merged)
    check_factors(ad, base)


def test_pattern_key_semantics():
    assert get_pattern_key(["q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert get_pattern_key(["proj"], "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert get_pattern_key(["layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj") != "x"
    assert get_pattern_key([r"layers\.\d+\.mlp\.up_proj"], "model.layers.7.mlp.up_proj") == r"layers\.\d+\.mlp\.up_proj"
    # the first matching key wins
    assert get_pattern_key(["q_proj", "self_attn.q_proj"], "a.self_attn.q_proj") == "q_proj"


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=12, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])
    base, merged = make_adapter(tiny_gpt2(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    # attn.c_proj is square (32 x 32): orientation follows fan_in_fan_out
    assert "transformer.h.0.attn.c_proj.weight" in changed and ad._loras["transformer.h.0.attn.c_proj"].transpose
    assert "transformer.h.1.mlp.c_proj.weight" in changed
    check_factors(ad, base)


def test_gpt2_only_square_modules_and_bias(tmp_path):
    # only square Conv1D layers + bias="all": shapes cannot tell the layout, config does
    def bump_biases(pm, g):
        for n, p in pm.named_parameters():
            if n.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g))

    cfg = LoraConfig(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["attn.c_proj"], bias="all")
    base, merged = make_adapter(tiny_gpt2(), cfg, tmp_path / "a", mutate_base=bump_biases)
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert "transformer.h.0.mlp.c_fc.bias" in changed and "transformer.h.0.mlp.c_fc.bias" in ad.replacements


def test_embedding_lora(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    assert ad._loras["model.embed_tokens"].embedding
    changed = check_exact(ad, base, merged)
    assert "model.embed_tokens.weight" in changed
    f = ad.factors("model.embed_tokens.weight")
    assert f[0].shape == (128, 4) and f[1].shape == (4, 32)


def test_modules_to_save_and_mixed_targets(tmp_path):
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj", "gate_proj", "down_proj", "lm_head"],
                     modules_to_save=["model.norm"])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert "model.norm.weight" in ad.replacements and "model.norm.weight" in changed
    assert "lm_head.weight" in changed and ad.factors("model.norm.weight") is None
    assert ad.unused_tensors == []
    check_factors(ad, base)


def test_modules_to_save_head(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, base, merged)
    assert set(ad.replacements) == {"lm_head.weight"}


def test_bin_adapter(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a", safe=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, base, merged)


def test_trainable_tokens(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[3, 5, 90])
    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert "model.embed_tokens.weight" in changed
    d = ad.delta("model.embed_tokens.weight", base["model.embed_tokens.weight"])
    assert set(torch.nonzero(d.abs().sum(1)).flatten().tolist()) == {3, 5, 90}


def test_prefix_tolerance(tmp_path):
    base, merged = make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
                                tmp_path / "a")
    # the same adapter bound to a base whose names lack "model." (e.g. LlamaModel)
    ad = LoraAdapter.load(tmp_path / "a")
    strip = lambda k: k[len("model."):] if k.startswith("model.") else k  # noqa: E731
    check_exact(ad, base, merged, rename=strip)
    assert ad.mapping["model.layers.0.self_attn.q_proj.weight"] == "layers.0.self_attn.q_proj.weight"
    # and to a base with an extra prefix
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, base, merged, rename=lambda k: "backbone." + k)


def test_gpu_style_device_and_dtype(tmp_path):
    base, merged = make_adapter(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    ad.bind({k: v.shape for k, v in base.items()})
    k = "model.layers.0.self_attn.q_proj.weight"
    d16 = ad.delta(k, base[k].to(torch.bfloat16))
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, ad.delta(k, base[k]))


# ------------------------------------------------------------------------------------------------------
# real GPT-2 adapters
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_gpt2():
    if not (REAL / "adapters").is_dir():
        pytest.skip(f"{REAL} is absent")
    cfg = GPT2Config.from_pretrained(str(REAL / "base_config"))
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(cfg).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged_cache: dict[str, dict] = {}

    def merged_for(name: str) -> dict:
        if name not in merged_cache:
            m = copy.deepcopy(model)
            pm = PeftModel.from_pretrained(m, str(REAL / "adapters" / name))
            sd = pm.merge_and_unload().state_dict()
            merged_cache[name] = {k: v.detach().clone() for k, v in sd.items() if not torch.equal(v, base[k])}
        return merged_cache[name]

    return base, merged_for


REAL_NAMES = ["abrhaleyarefaine1997__gpt2-tigrinya-lora", "Imran-Ali-Naeem__psuedo-to-code", "anirudh-ak__peft-gpt2"]


@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_gpt2_adapters(real_gpt2, name, caplog):
    base, merged_for = real_gpt2
    changed = merged_for(name)
    ad = LoraAdapter.load(REAL / "adapters" / name)
    with caplog.at_level(logging.WARNING, logger="llm_merging.model.lora"):
        ad.bind({k: tuple(v.shape) for k, v in base.items()})
    assert ad.param_names() == set(changed)
    for k, b in base.items():
        d = ad.delta(k, b)
        if k in changed:
            torch.testing.assert_close(b + d, changed[k], atol=1e-6, rtol=1e-5)
        else:
            assert d is None
    cfg = json.loads((REAL / "adapters" / name / "adapter_config.json").read_text())
    if cfg["task_type"] == "SEQ_CLS":
        assert ad.unused_tensors == ["base_model.model.score.weight"]
        assert "score.weight" in caplog.text and name in caplog.text
    else:
        assert ad.unused_tensors == []
        # c_proj matches both attn.c_proj (square, Conv1D) and mlp.c_proj
        assert "transformer.h.3.attn.c_proj.weight" in changed and "transformer.h.3.mlp.c_proj.weight" in changed


def test_real_gpt2_linear_merge(real_gpt2):
    base, merged_for = real_gpt2
    n1, n2 = REAL_NAMES[0], REAL_NAMES[1]
    m1, m2 = merged_for(n1), merged_for(n2)
    a1, a2 = LoraAdapter.load(REAL / "adapters" / n1), LoraAdapter.load(REAL / "adapters" / n2)
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    a1.bind(shapes)
    a2.bind(shapes)
    for k, b in base.items():
        d1, d2 = a1.delta(k, b), a2.delta(k, b)
        ours = b.clone()
        if d1 is not None:
            ours += 0.5 * d1
        if d2 is not None:
            ours += 0.5 * d2
        expected = 0.5 * m1.get(k, b) + 0.5 * m2.get(k, b)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_real_gpt2_prefix_mapping_onto_gpt2model():
    if not (REAL / "adapters").is_dir():
        pytest.skip(f"{REAL} is absent")
    # GPT2Model parameter names have no "transformer." prefix
    cfg = GPT2Config.from_pretrained(str(REAL / "base_config"))
    shapes = {}
    for i in range(cfg.n_layer):
        shapes[f"h.{i}.attn.c_attn.weight"] = (cfg.n_embd, 3 * cfg.n_embd)
        shapes[f"h.{i}.attn.c_proj.weight"] = (cfg.n_embd, cfg.n_embd)
        shapes[f"h.{i}.mlp.c_proj.weight"] = (4 * cfg.n_embd, cfg.n_embd)
    shapes["wte.weight"] = (cfg.vocab_size, cfg.n_embd)
    ad = LoraAdapter.load(REAL / "adapters" / "anirudh-ak__peft-gpt2")
    ad.bind(shapes)
    assert ad.param_names() == {f"h.{i}.attn.c_attn.weight" for i in range(cfg.n_layer)}


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------
def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_unsupported_variant_rejected(tmp_path):
    # DoRA is read exactly (tests/test_lora_variants.py); variants whose merge is not read are refused
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "qa", merge=False)
    cfgf = tmp_path / "qa" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["use_qalora"] = True
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "qa")
    assert "QALoRA" in _one_line(e) and "qa" in str(e.value)


def test_dora_tensor_without_flag_rejected(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), tmp_path / "dora",
                 merge=False)
    cfgf = tmp_path / "dora" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["use_dora"] = False
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="DoRA tensor"):
        LoraAdapter.load(tmp_path / "dora")


def test_lora_bias_rejected(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), tmp_path / "lb",
                 merge=False)
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "lb")
    assert "lora_bias" in _one_line(e)
    # the tensors alone are enough to refuse it
    cfgf = tmp_path / "lb" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["lora_bias"] = False
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lora_B.bias"):
        LoraAdapter.load(tmp_path / "lb")


def test_non_lora_peft_type_rejected(tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    pm.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "ia3")
    msg = _one_line(e)
    assert "IA3" in msg and "ia3" in msg


def test_base_modifying_init_rejected(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    cfgf = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["init_lora_weights"] = "pissa"
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="pissa"):
        LoraAdapter.load(tmp_path / "a")


def test_shape_mismatch(tmp_path):
    make_adapter(tiny_llama(hidden=32), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    other = tiny_llama(hidden=48)
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind({k: v.shape for k, v in other.state_dict().items()})
    msg = _one_line(e)
    assert "model.layers.0.self_attn.q_proj" in msg and "(32, 32)" in msg and "(48, 48)" in msg
    assert "a" in msg


def test_no_module_in_common(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind({k: v.shape for k, v in tiny_gpt2().state_dict().items()})
    assert "no module in common" in _one_line(e)


def test_module_missing_from_base(tmp_path):
    make_adapter(tiny_llama(layers=2), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind({k: v.shape for k, v in tiny_llama(layers=1).state_dict().items()})
    assert "model.layers.1.self_attn.q_proj" in _one_line(e)


def test_missing_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "empty")
    assert "adapter_config.json" in _one_line(e) and str(tmp_path / "empty") in str(e.value)
    with pytest.raises(AdapterError, match="does not exist"):
        LoraAdapter.load(tmp_path / "nope")
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "a")
    assert "adapter_model.safetensors" in _one_line(e)
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        LoraAdapter.load(tmp_path / "a")


def test_truncated_and_corrupted_safetensors(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    data = f.read_bytes()
    for name, content in [("trunc", data[:-100]), ("head", data[:40]), ("tiny", data[:5]),
                          ("garbage", b"\xff" * 8 + data[8:])]:
        d = tmp_path / name
        shutil.copytree(tmp_path / "a", d)
        (d / "adapter_model.safetensors").write_bytes(content)
        with pytest.raises(AdapterError) as e:
            LoraAdapter.load(d)
        assert str(d / "adapter_model.safetensors") in _one_line(e)


def test_truncated_bin(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a", safe=False)
    f = tmp_path / "a" / "adapter_model.bin"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "a")
    assert str(f) in _one_line(e)


def test_rank_config_mismatch(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    cfgf = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["r"] = 8
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="r=8"):
        LoraAdapter.load(tmp_path / "a")


def test_lora_on_tied_head(tmp_path):
    """GPT-2 ties lm_head to wte: PEFT merges an lm_head LoRA into the shared weight."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "c_attn"])
    base, merged = make_adapter(model, cfg, tmp_path / "a")
    assert not torch.equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
    # names as in named_parameters(): the tied head is not listed
    params = {k: v for k, v in base.items() if k != "lm_head.weight"}
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, params, merged)
    assert "transformer.wte.weight" in ad.param_names()
    check_factors(ad, params)


def test_two_loras_on_one_tied_parameter(tmp_path):
    model = tiny_gpt2()
    cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["lm_head", "wte"])
    base, merged = make_adapter(model, cfg, tmp_path / "a")
    params = {k: v for k, v in base.items() if k != "lm_head.weight"}
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, params, merged)
    bs, a = ad.factors("transformer.wte.weight")
    assert bs.shape == (128, 4) and a.shape == (4, 32)
    torch.testing.assert_close(bs @ a, ad.delta("transformer.wte.weight", base["transformer.wte.weight"]),
                               atol=1e-6, rtol=1e-5)
