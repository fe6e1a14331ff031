"""LoRA variants read exactly: LoRA on bare parameters (PEFT ``target_parameters``: fused mixture-of-experts
tensors and routers) and DoRA, against PEFT's own merge_and_unload and through whole merges."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import engine_method
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from llm_merging import ops  # noqa: E402
from llm_merging.core.errors import AdapterError  # noqa: E402
from llm_merging.merging.TaskArithmetic import TaskArithmetic  # noqa: E402
from llm_merging.merging.TiesMerge import TiesMerge  # noqa: E402
from llm_merging.model import engine, tiny  # noqa: E402
from llm_merging.model.engine import base_param_shapes  # noqa: E402
from llm_merging.model.lora import LoraAdapter  # noqa: E402

GptOssConfig = getattr(transformers, "GptOssConfig", None)
GptOssForCausalLM = getattr(transformers, "GptOssForCausalLM", None)

_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


# ------------------------------------------------------------------------------------------------------
# tiny models and adapters
# ------------------------------------------------------------------------------------------------------
def tiny_moe(family: str, seed: int = 0, square: bool = False, vocab: int = 128):
    """A tiny random mixture-of-experts model of ``family`` (4 experts, 2 layers); ``square``: expert
    intermediate size = hidden size."""
    torch.manual_seed(seed)
    inter = 32 if square else 24
    _COMMON = dict(globals()["_COMMON"], vocab_size=vocab)
    if family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=inter, num_local_experts=4, num_experts_per_tok=2,
                                                 **_COMMON))
    elif family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=inter,
                                                   shared_expert_intermediate_size=40, num_experts=4,
                                                   num_experts_per_tok=2, **_COMMON))
    elif family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=inter, num_experts=4,
                                                   num_experts_per_tok=2, head_dim=8, **_COMMON))
    elif family == "gpt_oss":
        if GptOssConfig is None:
            pytest.skip("this transformers has no gpt-oss")
        model = GptOssForCausalLM(GptOssConfig(intermediate_size=inter, num_local_experts=4, num_experts_per_tok=2,
                                               head_dim=8, **_COMMON))
    else:
        raise ValueError(family)
    return model.eval()


def router(family: str) -> str:
    return "mlp.router.weight" if family == "gpt_oss" else "mlp.gate.weight"


def moe_config(family: str, **kw) -> LoraConfig:
    target_modules = ["q_proj", "v_proj"] + (["shared_expert.up_proj"] if family == "qwen2_moe" else [])
    kw.setdefault("target_parameters", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", router(family)])
    return LoraConfig(r=kw.pop("r", 2), lora_alpha=kw.pop("lora_alpha", 6), target_modules=target_modules, **kw)


def randomise(pm, seed: int) -> None:
    """Nonzero random values for every adapter tensor (DoRA magnitudes kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def make_adapter(model, config: LoraConfig, out: Path, seed: int = 1, mutate=None) -> tuple[dict, dict]:
    """Wrap, randomise (then ``mutate(peft_model)``) and save; return (base state dict, PEFT merge_and_unload
    state dict)."""
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    pm = get_peft_model(model, config)
    randomise(pm, seed)
    if mutate is not None:
        with torch.no_grad():
            mutate(pm)
    pm.save_pretrained(str(out))
    merged = dict(pm.merge_and_unload().named_parameters())
    return base, {k: v.detach().clone() for k, v in merged.items()}


def check_exact(adapter: LoraAdapter, base: dict, merged: dict, atol: float = 1e-6) -> set[str]:
    """base + delta == PEFT's merged weights for every parameter; returns the changed names."""
    adapter.bind({k: tuple(v.shape) for k, v in base.items()})
    changed = set()
    for k, b in base.items():
        d = adapter.delta(k, b)
        if d is None:
            got = b
        else:
            assert d.dtype == torch.float32 and d.shape == b.shape
            got = b + d
            changed.add(k)
        torch.testing.assert_close(got, merged[k], atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert {k for k in base if not torch.equal(base[k], merged[k])} == changed == adapter.param_names()
    return changed


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------------
# LoRA on bare parameters (target_parameters) vs PEFT
# ------------------------------------------------------------------------------------------------------
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_target_parameters_exact(tmp_path, family):
    cfg = moe_config(family, rank_pattern={"layers.1.mlp.experts.down_proj": 3},
                     alpha_pattern={"mlp.experts.gate_up_proj": 5}, use_rslora=family == "qwen3_moe")
    base, merged = make_adapter(tiny_moe(family), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    for i in range(2):
        for p in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{p}"
            assert name in changed and base[name].dim() == 3
            assert ad.factors(name) is None and not ad.low_rank_only(name) and ad.is_variant(name)
            # every expert changes, each by a matrix of rank r
            d = ad.delta(name, base[name])
            r = 3 if (i, p) == (1, "down_proj") else 2
            assert all(int(torch.linalg.matrix_rank(d[e])) == r for e in range(4))
        assert f"model.layers.{i}.{router(family)}" in changed
        assert ad.factors(f"model.layers.{i}.{router(family)}") is None
    # ordinary target_modules in the same adapter keep their factors
    q = "model.layers.0.self_attn.q_proj.weight"
    assert ad.low_rank_only(q) and not ad.is_variant(q)
    bs, a = ad.factors(q)
    torch.testing.assert_close(bs @ a, ad.delta(q, base[q]))
    assert "model.layers.0.mlp.experts" in ad.module_names()
    assert not any(".base_layer" in m for m in ad.module_names())


def test_target_parameters_only_and_in_memory(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"])
    base, merged = make_adapter(tiny_moe("qwen3_moe"), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert changed == {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
    held = ad.in_memory()
    for k in changed:
        torch.testing.assert_close(held.delta(k, base[k]), ad.delta(k, base[k]), atol=0, rtol=0)
    # bound to the bare decoder's names (no "model." prefix), as a Qwen3MoeModel has them
    ad = LoraAdapter.load(tmp_path / "a")
    ad.bind({k[len("model."):]: tuple(v.shape) for k, v in base.items()})
    assert ad.param_names() == {f"layers.{i}.mlp.experts.down_proj" for i in range(2)}
    k = "model.layers.1.mlp.experts.down_proj"
    torch.testing.assert_close(base[k] + ad.delta(k[len("model."):], base[k]), merged[k], atol=1e-6, rtol=1e-5)


def test_square_experts_take_the_layout_of_their_module(tmp_path):
    # gpt-oss stores experts (E, in, out); with intermediate == hidden, down_proj is square per expert and
    # only gate_up_proj of the same module shows the layout
    base, merged = make_adapter(tiny_moe("gpt_oss", square=True), moe_config("gpt_oss"), tmp_path / "a")
    assert base["model.layers.0.mlp.experts.down_proj"].shape == (4, 32, 32)
    ad = LoraAdapter.load(tmp_path / "a")
    check_exact(ad, base, merged)
    # the same for Mixtral's (E, out, in)
    base, merged = make_adapter(tiny_moe("mixtral", square=True), moe_config("mixtral"), tmp_path / "b")
    check_exact(LoraAdapter.load(tmp_path / "b"), base, merged)


def test_square_experts_without_evidence_refused(tmp_path):
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    model = tiny_moe("gpt_oss", square=True)
    pm = get_peft_model(model, cfg)
    randomise(pm, 1)
    pm.save_pretrained(str(tmp_path / "a"))
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind(base_param_shapes(tiny_moe("gpt_oss", square=True)))
    msg = _one_line(e)
    assert "model.layers.0.mlp.experts.down_proj" in msg and "square" in msg


def test_target_parameters_errors(tmp_path):
    make_adapter(tiny_moe("mixtral"), moe_config("mixtral"), tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    # a base with other expert sizes
    torch.manual_seed(0)
    other = MixtralForCausalLM(MixtralConfig(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                                             **_COMMON))
    with pytest.raises(AdapterError) as e:
        ad.bind(base_param_shapes(other))
    assert "gate_up_proj" in _one_line(e) and "(4, 80, 32)" in str(e.value)
    # a base with fewer experts: the factors hold r × 4 ranks
    torch.manual_seed(0)
    fewer = MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=2, num_experts_per_tok=2,
                                             **_COMMON))
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "a").bind(base_param_shapes(fewer))
    assert "experts" in _one_line(e)
    # a dense base has no expert tensors
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(intermediate_size=64, **_COMMON))
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "a").bind(base_param_shapes(dense))
    assert "model.layers.0.mlp" in _one_line(e)
    # a rank that disagrees with the config: the rank of the LoRA on a parameter is checked once bound
    cfgf = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfgf.read_text())
    cfg["rank_pattern"] = {"mlp.experts.down_proj": 5}
    cfgf.write_text(json.dumps(cfg))
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind(base_param_shapes(tiny_moe("mixtral")))
    assert "r=5 × 4 experts" in _one_line(e) and "mlp.experts" in str(e.value)
    # and of an ordinary module when the adapter is loaded
    cfg["rank_pattern"], cfg["r"] = {}, 3
    cfgf.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="r=3"):
        LoraAdapter.load(tmp_path / "a")


# ------------------------------------------------------------------------------------------------------
# DoRA vs PEFT
# ------------------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=64, tie_word_embeddings=False, **_COMMON)).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def test_dora_llama(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True, rank_pattern={"up_proj": 2},
                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"])
    def retrain_embedding(pm):  # PEFT saves the embedding's base layer: DoRA then merges onto that weight
        pm.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)

    base, merged = make_adapter(tiny_llama(), cfg, tmp_path / "a", mutate=retrain_embedding)
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.up_proj.weight" in changed
    assert "model.embed_tokens.weight" in ad.replacements
    for k in changed:
        assert ad.factors(k) is None and not ad.low_rank_only(k) and ad.is_variant(k)
    # the task vector depends on the base weight, and comes in float32 from a bf16 base
    k = "model.layers.0.self_attn.q_proj.weight"
    d16 = ad.delta(k, base[k].to(torch.bfloat16))
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, ad.delta(k, base[k].to(torch.bfloat16).float()))
    assert not torch.allclose(ad.delta(k, base[k]), ad.delta(k, 2 * base[k]))


def test_dora_gpt2_conv1d(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=12, use_dora=True, fan_in_fan_out=True,
                     target_modules=["c_attn", "c_proj", "c_fc", "wte"])
    base, merged = make_adapter(tiny_gpt2(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    params = {k: v for k, v in base.items()}
    changed = check_exact(ad, params, merged)
    # attn.c_proj is square (32 x 32): Conv1D layout, per-output norm over its columns
    assert "transformer.h.0.attn.c_proj.weight" in changed and ad._loras["transformer.h.0.attn.c_proj"].transpose
    assert "transformer.wte.weight" in changed


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.conv1 = torch.nn.Conv1d(4, 6, 2)
        self.lin = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


def test_dora_convolutions(tmp_path):
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["conv", "conv1", "lin"])
    base, merged = make_adapter(_Convs(), cfg, tmp_path / "a")
    ad = LoraAdapter.load(tmp_path / "a")
    changed = check_exact(ad, base, merged)
    assert {"conv.weight", "conv1.weight", "lin.weight"} == changed


def test_dora_errors(tmp_path):
    make_adapter(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(f))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    assert key in sd
    # a magnitude that does not fit the layer
    bad = dict(sd)
    bad[key] = torch.ones(31)
    save_file(bad, str(f))
    ad = LoraAdapter.load(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        ad.bind(base_param_shapes(tiny_llama()))
    assert key in _one_line(e) and "(31)" in str(e.value)
    # use_dora without a magnitude vector
    del bad[key]
    save_file(bad, str(f))
    with pytest.raises(AdapterError) as e:
        LoraAdapter.load(tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj" in _one_line(e) and "magnitude" in str(e.value)


# ------------------------------------------------------------------------------------------------------
# whole merges through the engine
# ------------------------------------------------------------------------------------------------------


def _peft_deltas(base_dir: Path, adapters: list[Path]) -> tuple[list[dict], dict]:
    """ΔW of each adapter as PEFT applies it to the base loaded from ``base_dir``."""
    out = []
    ref = None
    for a in adapters:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        if ref is None:
            ref = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
        out.append({n: p.detach() - ref[n] for n, p in merged.named_parameters()})
    return out, ref


def _ties(name: str, tvs: list[torch.Tensor], parts: dict, **kw) -> torch.Tensor:
    """TIES of ``tvs``; a fused expert parameter that the engine merges part by part (one matrix per expert
    and projection, as a checkpoint stores them) gets TIES per part."""
    if name not in parts:
        return ops.ties(tvs, **kw)
    out = torch.empty(tvs[0].numel())
    for part in parts[name]:
        sl = slice(part.start, part.start + part.numel)
        out[sl] = ops.ties([t.reshape(-1)[sl].view(part.shape) for t in tvs], **kw).reshape(-1)
    return out.view(tvs[0].shape)


def _check_merges(base_dir: Path, adapters: list[Path], weights: list[float]) -> None:
    deltas, ref = _peft_deltas(base_dir, adapters)
    ta = engine_method(TaskArithmetic, base_dir, adapters, weights=weights, scale=0.9)
    ta.merge()
    density = [0.5, 0.3, 0.8][: len(adapters)]
    ties = engine_method(TiesMerge, base_dir, adapters, density=density, scale=1.2)
    ties.merge()
    ta_params, ties_params = dict(ta.base_model.named_parameters()), dict(ties.base_model.named_parameters())
    merge_parts = getattr(engine, "merge_parts", None)
    parts = merge_parts(ties.base_model) if merge_parts is not None else {}
    assert set(ta_params) == set(ref)
    changed = 0
    for name, b in ref.items():
        tvs = [d[name] for d in deltas]
        expected = b + 0.9 * sum(w * t for w, t in zip(weights, tvs))
        torch.testing.assert_close(ta_params[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if all(torch.count_nonzero(t) == 0 for t in tvs):
            torch.testing.assert_close(ties_params[name], b)
            continue
        changed += 1
        expected = b + _ties(name, tvs, parts, density=density, scale=1.2)
        torch.testing.assert_close(ties_params[name], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert changed > 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_target_parameters_merges(tmp_path, family):
    base_dir = tmp_path / "base"
    tok = tiny.build_tokenizer(base_dir)
    tiny_moe(family, vocab=len(tok)).save_pretrained(str(base_dir))
    adapters = []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        cfg = moe_config(family, r=2 + i) if i == 0 else moe_config(
            family, r=3, target_parameters=["mlp.experts.gate_up_proj", router(family)])
        pm = get_peft_model(model, cfg)
        randomise(pm, 10 + i)
        pm.save_pretrained(str(tmp_path / f"lora{i}"))
        adapters.append(tmp_path / f"lora{i}")
    _check_merges(base_dir, adapters, [0.7, 0.4])


def test_dora_and_lora_merges(tmp_path):
    base_dir = tiny.base_dir("decoder")
    adapters = []
    for i, spec in enumerate([dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                              dict(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"])]):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        pm = get_peft_model(model, LoraConfig(use_dora=True, **spec))
        randomise(pm, 20 + i)
        pm.save_pretrained(str(tmp_path / f"dora{i}"))
        adapters.append(tmp_path / f"dora{i}")
    adapters.append(tiny.lora_expert_dir("decoder", 0))  # a plain LoRA among them
    _check_merges(base_dir, adapters, [0.5, 0.3, 0.6])
