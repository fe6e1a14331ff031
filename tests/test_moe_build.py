"""``llm-merging moe``: MoE models built from dense experts (mergekit-moe's YAML).

Checked: the output loads in transformers with no missing or unexpected tensor and generates; every expert
tensor equals its source (LoRA experts: PEFT's ``merge_and_unload``); router rows equal an independent
computation of mergekit-moe's rule (hidden and cheap_embed, negative prompts included); mergekit-moe's own
output on the same configs when it is installed (``$MERGEKIT_VENV`` or PATH); seeded random gates; every
bad input (exit 2, one line, nothing written); ``--eval``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import dir_tensors, mergekit_tool

from llm_merging.cli import moe as moe_cli
from llm_merging.model import moe, tiny
from llm_merging.model.save import ShardWriter

PROMPTS = {
    0: (["The quick brown fox", "a question about science and the sky"], ["summary of the news today"]),
    1: (["summary of the news today", "A summary is"], None),
    2: (["Options: A. B. C. D.", "choose the best option"], ["The lazy dog"]),
}


# ------------------------------------------------------------------------------------------------ models
def _save_family(root: Path, model_type: str, n_experts: int, *, intermediate: int = 96, seed: int = 0) -> dict:
    """A tiny dense base of ``model_type`` with the tiny tokenizer, and ``n_experts`` full fine-tunes
    (base + seeded noise on every tensor)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    tok_dir = tiny.base_dir("decoder")
    vocab = json.loads((tok_dir / "config.json").read_text())["vocab_size"]
    common = {"vocab_size": vocab + 64,  # embedding rows to spare: Qwen tokenizer classes add a token
              "hidden_size": 64, "intermediate_size": intermediate, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False}
    if model_type == "qwen3":
        common["head_dim"] = 16
    cfg = CONFIG_MAPPING[model_type](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    out = {"base": root / f"{model_type}-base"}
    model.save_pretrained(str(out["base"]))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / f).is_file():
            shutil.copy(tok_dir / f, out["base"] / f)
    gen = torch.Generator().manual_seed(100 + seed)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n_experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + torch.randn(p.shape, generator=gen) * 0.05)
        out[i] = root / f"{model_type}-expert{i}"
        model.save_pretrained(str(out[i]))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-llama")
    out = {"base": tiny.base_dir("decoder"), 0: tiny.full_expert_dir("decoder", 0),
           1: tiny.full_expert_dir("decoder", 1), "lora": tiny.lora_expert_dir("decoder", 1)}
    out["qwen2"] = _save_family(root, "qwen2", 1)[0]
    out["wide"] = _save_family(root, "llama", 1, intermediate=160)[0]
    return out


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return _save_family(tmp_path_factory.mktemp("moe-qwen2"), "qwen2", 3, seed=1)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _save_family(tmp_path_factory.mktemp("moe-qwen3"), "qwen3", 2, seed=2)


def _expert(model, i, with_prompts=True):
    e = {"source_model": str(model)}
    if with_prompts:
        pos, neg = PROMPTS[i % 3]
        e["positive_prompts"] = pos
        if neg:
            e["negative_prompts"] = neg
    return e


def _config(tmp_path: Path, doc: dict, name: str = "moe.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _build(tmp_path: Path, doc: dict, name: str = "out", *extra: str) -> Path:
    cfg = _config(tmp_path, doc, f"{name}.yml")
    code = moe_cli.main([str(cfg), str(tmp_path / name), "-q", *extra])
    assert code == 0
    return tmp_path / name


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()




# ------------------------------------------------------------------------------ independent gate rules
def _tokenizer(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return tok


def _hidden_rule(base, prompts_pos, prompts_neg, layers):
    """mergekit-moe's ``hidden`` rule written out: bf16 base; one left-padded batch of BOS+prompt; per layer
    the input hidden state of each prompt's last token, mean over prompts; positive minus negative;
    unit length per layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).eval()
    tok = _tokenizer(base)

    def side(prompts):
        batch = tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True).hidden_states
        rows = []
        for layer in range(layers):  # hidden_states[layer] is the input of decoder layer `layer`
            last = hs[layer][:, -1, :]
            rows.append(last.sum(dim=0) / last.shape[0])
        return torch.stack(rows)

    v = side(prompts_pos)
    if prompts_neg:
        v = v - side(prompts_neg)
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _cheap_rule(base, prompts_pos, prompts_neg, layers):
    """mergekit-moe's ``cheap_embed`` rule, prompt by prompt (no padding): the sum of the token embeddings
    of BOS+prompt over tokens and prompts, unit length; positive minus negative, unit length again."""
    embed = dir_tensors(base)["model.embed_tokens.weight"].double()
    tok = _tokenizer(base)

    def side(prompts):
        total = torch.zeros(embed.shape[1], dtype=torch.float64)
        for p in prompts:
            ids = tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]
            total += embed[ids].sum(dim=0)
        return total / total.norm()

    v = side(prompts_pos)
    if prompts_neg:
        v = v - side(prompts_neg)
    return (v / v.norm()).repeat(layers, 1)


# ------------------------------------------------------------------------------------------------ tests
def test_mixtral_loads_generates_and_holds_each_expert(tmp_path, llama):
    """Llama experts (two full fine-tunes and a LoRA, BASE+LORA) → Mixtral: every tensor where it belongs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = llama["base"]
    doc = {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
           "experts": [_expert(llama[0], 0), _expert(llama[1], 1),
                       {**_expert(base, 2), "source_model": f"{base}+{llama['lora']}"}]}
    out = _build(tmp_path, doc)
    model = _load(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 3
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = model.generate(**tok("The quick brown", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert ids.shape[1] > 4
    state = model.state_dict()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(llama["lora"]))
    lora_merged = peft.merge_and_unload().state_dict()
    sources = [dir_tensors(llama[0]), dir_tensors(llama[1]), lora_merged]
    base_t = dir_tensors(base)
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for e, src in enumerate(sources):
            p = f"model.layers.{layer}.mlp."
            gate_up = torch.cat([src[p + "gate_proj.weight"], src[p + "up_proj.weight"]], dim=0)
            torch.testing.assert_close(experts.gate_up_proj[e], gate_up.float(), rtol=0, atol=1e-6)
            torch.testing.assert_close(experts.down_proj[e], src[p + "down_proj.weight"].float(), rtol=0, atol=1e-6)
        gate = state[f"model.layers.{layer}.mlp.gate.weight"]
        for e in range(3):
            want = _hidden_rule(base, *PROMPTS[e], layers=2)[layer].float()
            torch.testing.assert_close(gate[e], want, rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight"):
        torch.testing.assert_close(state[name], base_t[name].float(), rtol=0, atol=0)


def test_hidden_rows_close_to_float32_prompt_by_prompt(tmp_path, llama):
    """The bf16 rule's rows point where float32 hidden states of each prompt alone point (cosine > 0.99)."""
    from transformers import AutoModelForCausalLM

    base = llama["base"]
    plan = moe.plan_moe(moe.load_moe_config(_config(tmp_path, {
        "base_model": str(base), "experts": [_expert(llama[0], 0), _expert(llama[1], 1)]})))
    gates = moe.compute_gates(plan, progress=False).float()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    tok = _tokenizer(base)

    def side(prompts):
        rows = []
        for p in prompts:
            batch = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                hs = model(**batch, output_hidden_states=True).hidden_states
            rows.append(torch.stack([hs[layer][0, -1] for layer in range(2)]))
        return torch.stack(rows).mean(dim=0)

    for e in range(2):
        pos, neg = PROMPTS[e]
        v = side(pos) - (side(neg) if neg else 0)
        cos = torch.nn.functional.cosine_similarity(gates[:, e], v, dim=-1)
        assert bool((cos > 0.99).all()), cos


def test_cheap_embed_rows_equal_the_rule(tmp_path, llama):
    base = llama["base"]
    doc = {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "float32",
           "experts": [_expert(llama[0], 0), _expert(llama[1], 1), _expert(llama[0], 2)]}
    state = dir_tensors(_build(tmp_path, doc))
    for e in range(3):
        want = _cheap_rule(base, *PROMPTS[e], layers=2)
        for layer in range(2):
            got = state[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e].double()
            torch.testing.assert_close(got, want[layer], rtol=0, atol=1e-6)


def test_saved_names_are_what_save_pretrained_writes(tmp_path, llama):
    """The files hold exactly the tensors transformers' own save_pretrained writes for the loaded model."""
    base = llama["base"]
    doc = {"base_model": str(base), "gate_mode": "random", "dtype": "bfloat16",
           "experts": [_expert(llama[0], 0, False), _expert(llama[1], 1, False)]}
    out = _build(tmp_path, doc)
    model = _load(out)
    model.save_pretrained(str(tmp_path / "resaved"))
    ours, theirs = dir_tensors(out), dir_tensors(tmp_path / "resaved")
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype == torch.bfloat16 and torch.equal(ours[k], theirs[k]), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _saved_shapes(config) -> dict:
    """transformers' own answer: the tensors save_pretrained writes for ``config`` (a model on the meta
    device; tied weights removed, weight conversions reverted), name -> shape."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    kept = remove_tied_weights_from_state_dict(dict(model.state_dict()), model)
    return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(kept)).items()}


@pytest.mark.parametrize("model_type,kind,extra", [
    ("llama", "mixtral", {}), ("llama", "mixtral", {"tie_word_embeddings": True}), ("mistral", "mixtral", {}),
    ("llama", "qwen2_moe", {}), ("qwen2", "qwen2_moe", {"tie_word_embeddings": True}), ("qwen3", "qwen3_moe", {}),
    ("qwen3", "qwen3_moe", {"attention_bias": True, "head_dim": 8})])
def test_layout_is_what_transformers_saves(model_type, kind, extra):
    """The output's tensors, planned from the base's tensors alone, are the ones transformers saves for the
    output config (every kind; tied embeddings; Qwen3 attention biases and q/k norms)."""
    from transformers import CONFIG_MAPPING

    base_config = CONFIG_MAPPING[model_type](vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, **extra)
    base_shapes = _saved_shapes(base_config)
    out_kind = next(k for k in moe.OUTPUT_KINDS if k.key == kind)
    layout = moe.moe_layout(out_kind, base_shapes, 3, 5, torch.bfloat16, base_config.tie_word_embeddings)
    want = _saved_shapes(moe.output_config(out_kind, base_config, 5, 2, torch.bfloat16))
    assert {k: shape for k, (shape, _) in layout.items()} == want
    assert {dtype for _, dtype in layout.values()} == {torch.bfloat16}
    with pytest.raises(KeyError, match="norm"):  # a base without a tensor the output takes from it
        moe.moe_layout(out_kind, {k: v for k, v in base_shapes.items() if k != "model.norm.weight"}, 3, 5,
                       torch.bfloat16, base_config.tie_word_embeddings)


def test_qwen2_moe_with_shared_expert(tmp_path, qwen2):
    """Qwen2 experts and a gated shared expert → Qwen2-MoE (shared expert, its gate, q/k/v biases)."""
    doc = {"base_model": str(qwen2["base"]), "architecture": "qwen", "gate_mode": "cheap_embed", "dtype": "float32",
           "experts": [_expert(qwen2[0], 0), _expert(qwen2[1], 1)], "shared_experts": [_expert(qwen2[2], 2)]}
    out = _build(tmp_path, doc)
    model = _load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    model.save_pretrained(str(tmp_path / "resaved"))
    assert set(dir_tensors(out)) == set(dir_tensors(tmp_path / "resaved"))  # the names transformers writes itself
    state = model.state_dict()
    shared, base = dir_tensors(qwen2[2]), dir_tensors(qwen2["base"])
    for layer in range(3):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(state[f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"],
                                       shared[f"model.layers.{layer}.mlp.{proj}.weight"], rtol=0, atol=0)
        torch.testing.assert_close(state[f"model.layers.{layer}.self_attn.q_proj.bias"],
                                   base[f"model.layers.{layer}.self_attn.q_proj.bias"], rtol=0, atol=0)
        want = _cheap_rule(qwen2["base"], *PROMPTS[2], layers=3)[layer].float()
        torch.testing.assert_close(state[f"model.layers.{layer}.mlp.shared_expert_gate.weight"][0], want,
                                   rtol=0, atol=1e-6)
    tok_ids = torch.tensor([[1, 40, 41, 42]])
    assert model.generate(tok_ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_qwen3_moe(tmp_path, qwen3):
    doc = {"base_model": str(qwen3["base"]), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
           "experts": [_expert(qwen3[0], 0), _expert(qwen3[1], 1)]}
    model = _load(_build(tmp_path, doc))
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts_per_tok == 1
    want = _hidden_rule(qwen3["base"], *PROMPTS[1], layers=3)
    for layer in range(3):
        torch.testing.assert_close(model.model.layers[layer].mlp.gate.weight[1], want[layer].float(), rtol=0, atol=1e-6)
    src = dir_tensors(qwen3[1])
    torch.testing.assert_close(model.model.layers[2].mlp.experts.down_proj[1], src["model.layers.2.mlp.down_proj.weight"])


def test_random_gates_are_seeded(tmp_path, llama):
    doc = {"base_model": str(llama["base"]), "gate_mode": "random", "dtype": "float32",
           "experts": [_expert(llama[0], 0, False), {**_expert(llama[1], 1, False), "noise_scale": 0.01}]}
    a = dir_tensors(_build(tmp_path, doc, "a", "--seed", "3"))
    b = dir_tensors(_build(tmp_path, doc, "b", "--seed", "3"))
    c = dir_tensors(_build(tmp_path, doc, "c", "--seed", "4"))
    gate = "model.layers.1.block_sparse_moe.gate.weight"
    noisy = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(a[gate], b[gate]) and torch.equal(a[noisy], b[noisy])
    assert not torch.equal(a[gate], c[gate]) and not torch.equal(a[noisy], c[noisy])
    torch.testing.assert_close(a[gate], moe.random_gates(2, 2, 64, seed=3)[1])
    clean = dir_tensors(llama[1])["model.layers.0.mlp.down_proj.weight"]
    assert 0.005 < float((a[noisy] - clean).std()) < 0.02  # noise_scale 0.01 on that expert only
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.0.w2.weight"],
                       dir_tensors(llama[0])["model.layers.0.mlp.down_proj.weight"])
    u = moe.random_gates(2, 3, 64, seed=0, uniform=True)
    assert float(u.abs().max()) <= 64 ** -0.5 and float(u.abs().max()) > 0.9 * 64 ** -0.5


def test_pure_gate_functions():
    hs = [torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + i for i in range(4)]  # 3 layers + final
    last = moe.pool_hidden_states(hs, average=False)
    assert last.shape == (3, 4)
    torch.testing.assert_close(last[1], (hs[1][0, -1] + hs[1][1, -1]) / 2)
    mean = moe.pool_hidden_states(hs, average=True)
    torch.testing.assert_close(mean[2], hs[2].mean(dim=(0, 1)))
    rows = moe.gate_rows(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 4.0]]))
    torch.testing.assert_close(rows, torch.tensor([[1.0, 0.0]]))
    assert moe.degenerate_layers(torch.stack([torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.001]])])) == [1]


def test_list_architectures(capsys):
    assert moe_cli.main(["--list-architectures"]) == 0
    out = capsys.readouterr().out
    for key in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek"):
        assert key in out
    assert "not available" in out.splitlines()[1]


def test_eval_after_build(tmp_path, llama):
    doc = {"base_model": str(llama["base"]), "gate_mode": "random",
           "experts": [_expert(llama[0], 0, False), _expert(llama[1], 1, False)]}
    cfg = _config(tmp_path, doc)
    data = [f for f in tiny.sample_data_files() if "cosmos" in f]
    code = moe_cli.main([str(cfg), str(tmp_path / "out"), "-q", "--eval", "-d", *data, "--max-examples", "3",
                         "--output_folder", str(tmp_path / "eval")])
    assert code == 0
    line = json.loads((tmp_path / "eval" / "moe" / "scores.jsonl").read_text().splitlines()[-1])
    assert "accuracy" in json.dumps(line)
    assert (tmp_path / "eval" / "moe" / "predictions").is_dir()


# ------------------------------------------------------------------------------------------------ errors
def _bad(tmp_path, capsys, doc, expect: tuple[str, ...], *extra):
    cfg = _config(tmp_path, doc, "bad.yml")
    out = tmp_path / "bad-out"
    code = moe_cli.main([str(cfg), str(out), "-q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for text in expect:
        assert text in err[0], err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad-out")]
    return err[0]


def _ok_doc(llama, **kw):
    return {"base_model": str(llama["base"]), "experts": [_expert(llama[0], 0), _expert(llama[1], 1)], **kw}


def test_error_expert_of_another_architecture(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][1]["source_model"] = str(llama["qwen2"])
    _bad(tmp_path, capsys, doc, ("experts[1].source_model", "qwen2", "llama"))


def test_error_expert_of_another_shape(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][0]["source_model"] = str(llama["wide"])
    _bad(tmp_path, capsys, doc, ("experts[0].source_model", "intermediate_size"))


def test_error_config_disagrees_with_weights(tmp_path, capsys, llama):
    """A base whose config.json does not describe its weights: one line naming base_model, nothing left
    (found while the weights are being written: the temporary directory is removed)."""
    base = tmp_path / "base-edited"
    shutil.copytree(llama["base"], base)
    data = json.loads((base / "config.json").read_text())
    data["num_hidden_layers"] = 5
    (base / "config.json").write_text(json.dumps(data))
    _bad(tmp_path, capsys, {**_ok_doc(llama, gate_mode="random"), "base_model": str(base)},
         ("base_model", "num_hidden_layers 5", "hold 2"))


def test_error_hidden_without_prompts(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    del doc["experts"][1]["positive_prompts"]
    _bad(tmp_path, capsys, doc, ("experts[1].positive_prompts", "hidden"))
    doc = _ok_doc(llama, gate_mode="cheap_embed")
    doc["experts"][1]["positive_prompts"] = []
    _bad(tmp_path, capsys, doc, ("experts[1].positive_prompts",))


def test_error_same_prompts_for_every_expert(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][1] = {**doc["experts"][0], "source_model": str(llama[1])}
    _bad(tmp_path, capsys, doc, ("experts:", "same positive and negative prompts"))


def test_error_shared_experts_for_mixtral(tmp_path, capsys, llama):
    doc = _ok_doc(llama, architecture="mixtral", shared_experts=[_expert(llama[0], 2)])
    _bad(tmp_path, capsys, doc, ("shared_experts", "Mixtral"))
    doc = _ok_doc(llama, architecture="qwen3_moe")
    _bad(tmp_path, capsys, doc, ("base_model", "qwen3"))
    _bad(tmp_path, capsys, _ok_doc(llama, architecture="deepseek"), ("architecture", "transformers"))


def test_error_experts_per_token(tmp_path, capsys, llama):
    _bad(tmp_path, capsys, _ok_doc(llama, experts_per_token=3), ("experts_per_token", "more than the 2 experts"))
    _bad(tmp_path, capsys, _ok_doc(llama, experts_per_token=0), ("experts_per_token", "positive integer"))


def test_error_missing_model(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][0]["source_model"] = str(tmp_path / "nowhere")
    _bad(tmp_path, capsys, doc, ("experts[0].source_model", "does not exist"))
    _bad(tmp_path, capsys, {**_ok_doc(llama), "base_model": str(tmp_path / "nobase")}, ("base_model", "does not exist"))


def test_error_unknown_keys_and_values(tmp_path, capsys, llama):
    _bad(tmp_path, capsys, _ok_doc(llama, merge_method="ties"), ("merge_method", "unknown key"))
    doc = _ok_doc(llama)
    doc["experts"][0]["weight"] = 1.0
    _bad(tmp_path, capsys, doc, ("experts[0].weight", "unknown key"))
    _bad(tmp_path, capsys, _ok_doc(llama, gate_mode="learned"), ("gate_mode", "learned"))
    _bad(tmp_path, capsys, _ok_doc(llama, architecture="switch"), ("architecture", "switch"))
    _bad(tmp_path, capsys, _ok_doc(llama, dtype="int8"), ("dtype",))


def test_error_lora_without_base(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][0]["source_model"] = str(llama["lora"])
    _bad(tmp_path, capsys, doc, ("experts[0].source_model", "BASE+LORA"))


def test_error_same_model_everywhere(tmp_path, capsys, llama):
    doc = _ok_doc(llama)
    doc["experts"][1]["source_model"] = str(llama[0])
    _bad(tmp_path, capsys, doc, ("experts", "--allow-same-experts"))


def test_error_out_dir_not_new(tmp_path, capsys, llama):
    """OUT_DIR must be new or empty and none of the inputs: refused before any weight is read, its files
    intact; an empty existing directory is built into."""
    base = tmp_path / "base-copy"  # a copy: were OUT_DIR == base replaced, only the copy would be lost
    shutil.copytree(llama["base"], base)
    expert = tmp_path / "expert-copy"
    shutil.copytree(llama[0], expert)
    doc = {"base_model": str(base), "gate_mode": "random", "dtype": "float32",
           "experts": [_expert(expert, 0, False), _expert(llama[1], 1, False)]}
    cfg = _config(tmp_path, doc)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine", encoding="utf-8")
    before = {d: sorted((p.name, p.stat().st_size) for p in d.iterdir()) for d in (base, expert, full)}
    for out in (full, base, expert, tmp_path, full / "notes.txt"):
        code = moe_cli.main([str(cfg), str(out), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        why = "existing file" if out.is_file() else "not empty"
        assert f"OUT_DIR '{out}'" in err[0] and why in err[0], err[0]
    assert {d: sorted((p.name, p.stat().st_size) for p in d.iterdir()) for d in before} == before
    assert (full / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    plan = moe.plan_moe(moe.load_moe_config(cfg))  # the library call refuses too
    with pytest.raises(moe.ConfigError, match="output_dir .* overlaps the input"):
        moe.build_moe(plan, base, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert moe_cli.main([str(cfg), str(empty), "-q"]) == 0
    _load(empty)


def test_error_max_shard_size(tmp_path, capsys, llama):
    err = _bad(tmp_path, capsys, _ok_doc(llama, gate_mode="random"), ("--max-shard-size", "banana"),
               "--max-shard-size", "banana")
    assert "internal" not in err
    _bad(tmp_path, capsys, _ok_doc(llama, gate_mode="random"), ("--max-shard-size", "'0'"), "--max-shard-size", "0")
    assert moe.parse_shard_size("200KB") == 200_000 and moe.parse_shard_size("2GiB") == 2 * 2 ** 30
    assert moe.parse_shard_size(" 1.5 MB") == 1_500_000 and moe.parse_shard_size(123) == 123


def test_error_yaml_documents(tmp_path, capsys, llama):
    """Exactly one YAML document; broken YAML names the line."""
    out = tmp_path / "bad-out"
    for name, text, expect in (("two.yml", yaml.safe_dump(_ok_doc(llama)) + "---\n" + yaml.safe_dump(_ok_doc(llama)),
                                "found 2"),
                               ("empty.yml", "", "found 0"),
                               ("broken.yml", "base_model: [a\nexperts: b\n", "not valid YAML at line"),
                               ("list.yml", "- a\n- b\n", "top level: expected a mapping, got list")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        code = moe_cli.main([str(tmp_path / name), str(out), "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"moe config {tmp_path / name}" in err[0] and expect in err[0], err[0]
    assert not out.exists()


def test_error_tokenizer_source_without_tokenizer(tmp_path, capsys, llama):
    notok = tmp_path / "notok"
    notok.mkdir()
    shutil.copy(Path(llama["base"]) / "config.json", notok / "config.json")
    _bad(tmp_path, capsys, _ok_doc(llama, gate_mode="random", tokenizer_source=str(notok)),
         ("tokenizer_source", "cannot load the tokenizer", str(notok)))


def test_device_auto_is_the_gpu_when_there_is_one(tmp_path, capsys, llama, monkeypatch):
    seen = []

    def plan(cfg, **kw):
        seen.append(kw["device"])
        raise moe.ConfigError("stop here")

    monkeypatch.setattr(moe_cli, "plan_moe", plan)
    cfg = _config(tmp_path, _ok_doc(llama))
    for gpu in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert moe_cli.main([str(cfg), str(tmp_path / "out"), "-q", "--device", "auto"]) == 2
    assert seen == ["cuda", "cpu"]
    assert moe_cli.main([str(cfg), str(tmp_path / "out"), "-q", "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("where", ["weights", "gates"])
def test_failure_while_writing_leaves_nothing(tmp_path, llama, monkeypatch, where):
    """A failure in the thread writing the weights (the disk fills up) or in the main one (computing the
    gates) while the other works: the error comes out, the thread has ended and nothing is left."""
    copied = []
    real = ShardWriter.copy

    def copy(self, name, *args):
        copied.append(name)
        if where == "weights" and len(copied) == 5:
            raise OSError("disk full")
        real(self, name, *args)

    def gates(plan, progress=True):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(ShardWriter, "copy", copy)
    if where == "gates":
        monkeypatch.setattr(moe, "compute_gates", gates)
    plan = moe.plan_moe(moe.load_moe_config(_config(tmp_path, _ok_doc(llama, gate_mode="random"))))
    with pytest.raises(OSError if where == "weights" else RuntimeError):
        moe.build_moe(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not [t for t in threading.enumerate() if t.name.startswith("moe-weights")]
    assert where == "gates" or len(copied) == 5  # the thread stopped at the failure


# ------------------------------------------------------------------------------------------- mergekit
def _mergekit_moe() -> str | None:
    return mergekit_tool("mergekit-moe")


def _both(tmp_path, doc, name):
    ours = _load(_build(tmp_path, doc, name)).state_dict()
    cfg = _config(tmp_path, doc, f"{name}-mk.yml")
    subprocess.run([_mergekit_moe(), str(cfg), str(tmp_path / f"{name}-mk"), "--device", "cpu"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    theirs = _load(tmp_path / f"{name}-mk").state_dict()
    assert set(ours) == set(theirs)
    return ours, theirs


@pytest.mark.skipif(_mergekit_moe() is None, reason="mergekit-moe not found ($MERGEKIT_VENV or PATH)")
@pytest.mark.parametrize("family,mode", [("llama", "hidden"), ("llama", "cheap_embed"), ("llama", "hidden_avg"),
                                         ("qwen2", "hidden"), ("qwen3", "cheap_embed")])
def test_equals_mergekit_moe(tmp_path, request, family, mode):
    """The loaded models' tensors (gates included) equal mergekit-moe's to 1e-4 relative (float32 output)."""
    models = request.getfixturevalue(family)
    doc = {"base_model": str(models["base"]), "gate_mode": mode, "dtype": "float32",
           "experts": [_expert(models[0], 0), _expert(models[1], 1)]}
    if family == "qwen2":  # mergekit-moe 0.1.5 opens only the base and routed experts: the shared one is the base
        doc["shared_experts"] = [_expert(models["base"], 2)]
    ours, theirs = _both(tmp_path, doc, f"{family}-{mode}")
    for name, t in theirs.items():
        err = float((ours[name].double() - t.double()).abs().max()) / max(float(t.double().abs().max()), 1e-12)
        assert err <= 1e-4, f"{name}: {err:.2e} from mergekit-moe"


def test_sharded_output_loads(tmp_path, llama):
    """Small shards: several safetensors files and the index save_pretrained writes; loads the same."""
    doc = {"base_model": str(llama["base"]), "gate_mode": "random", "dtype": "float32",
           "experts": [_expert(llama[0], 0, False), _expert(llama[1], 1, False)]}
    whole = dir_tensors(_build(tmp_path, doc, "whole"))
    out = _build(tmp_path, doc, "sharded", "--max-shard-size", "200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(whole)
    state = _load(out).state_dict()
    torch.testing.assert_close(state["model.layers.1.mlp.gate.weight"], whole["model.layers.1.block_sparse_moe.gate.weight"])
