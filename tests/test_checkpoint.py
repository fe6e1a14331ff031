"""Lazy checkpoint reading (safetensors / .bin, single / sharded) and full fine-tunes as task vectors."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llm_merging.core.errors import CheckpointError  # noqa: E402
from llm_merging.model.checkpoint import (  # noqa: E402
    CheckpointReader,
    FullExpert,
    match_names,
    read_safetensors_header,
)


def tiny_llama(seed=0, hidden=32, vocab=128, tie=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()


def perturbed(model, seed=7, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def sd_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_bin_sharded(sd: dict, out: Path, n_shards=2):
    out.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        part = keys[i::n_shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        torch.save({k: sd[k].contiguous() for k in part}, out / fname)
        weight_map.update({k: fname for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_reads(reader: CheckpointReader, sd: dict):
    assert set(reader.keys()) == set(sd)
    for k, v in sd.items():
        assert reader.shape(k) == tuple(v.shape)
        assert torch.equal(reader.get(k), v)


# ------------------------------------------------------------------------------------------------------
# CheckpointReader
# ------------------------------------------------------------------------------------------------------
def test_sharded_safetensors(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shards = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    with CheckpointReader(tmp_path / "m") as r:
        assert r.format == "safetensors"
        assert_reads(r, m.state_dict())
        t = r.get("model.layers.0.self_attn.q_proj.weight", dtype=torch.bfloat16)
        assert t.dtype == torch.bfloat16


def test_single_safetensors_and_file_path(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    with CheckpointReader(tmp_path / "m") as r:
        assert_reads(r, m.state_dict())
    with CheckpointReader(tmp_path / "m" / "model.safetensors") as r:
        assert_reads(r, m.state_dict())


def test_bin_single_and_sharded(tmp_path):
    m = tiny_llama()
    sd = sd_of(m)
    (tmp_path / "single").mkdir()
    torch.save(sd, tmp_path / "single" / "pytorch_model.bin")
    with CheckpointReader(tmp_path / "single") as r:
        assert r.format == "bin"
        assert_reads(r, sd)
        t = r.get("lm_head.weight")
        t.add_(1.0)  # callers own what they get: the mmap-ed file is untouched
        assert torch.equal(r.get("lm_head.weight"), sd["lm_head.weight"])
    save_bin_sharded(sd, tmp_path / "sharded", 3)
    with CheckpointReader(tmp_path / "sharded") as r:
        assert_reads(r, sd)


def test_missing_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        CheckpointReader(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nothing")


def test_truncated_shard_named(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shard = sorted((tmp_path / "m").glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path / "m")
    msg = str(e.value)
    assert str(shard) in msg and "truncated" in msg and "\n" not in msg


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_corrupted_single_safetensors(tmp_path, cut):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    if cut == -1:  # header length field pointing far beyond the file
        data = (2**40).to_bytes(8, "little") + data[8:]
    else:
        data = data[:cut]
    f.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path / "m")
    assert str(f) in str(e.value)


def test_header_check_before_reading(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.randn(100)}, str(f))
    header = read_safetensors_header(f)
    assert header["a"]["shape"] == [4, 4]
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="needs .* bytes but the file has"):
        read_safetensors_header(f)


def test_broken_index(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    idx = tmp_path / "m" / "model.safetensors.index.json"
    good = idx.read_text()
    idx.write_text("{ broken")
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(tmp_path / "m")
    assert str(idx) in str(e.value)
    data = json.loads(good)
    data["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00099-of-00099.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="model-00099-of-00099.safetensors"):
        CheckpointReader(tmp_path / "m")
    data = json.loads(good)
    data["weight_map"]["not.a.tensor"] = data["weight_map"]["lm_head.weight"]
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not.a.tensor"):
        CheckpointReader(tmp_path / "m")


def test_truncated_bin_shard(tmp_path):
    sd = sd_of(tiny_llama())
    save_bin_sharded(sd, tmp_path / "b", 2)
    shard = tmp_path / "b" / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-300])
    r = CheckpointReader(tmp_path / "b")
    key = next(k for k in r.keys() if r.file_of(k) == shard)
    with pytest.raises(CheckpointError) as e:
        r.get(key)
    assert str(shard) in str(e.value)


# ------------------------------------------------------------------------------------------------------
# name matching
# ------------------------------------------------------------------------------------------------------
def test_match_names():
    dst = ["model.layers.0.q.weight", "model.layers.1.q.weight", "model.norm.weight", "lm_head.weight"]
    assert match_names(["layers.0.q.weight", "layers.1.q.weight", "norm.weight"], dst) == {
        "layers.0.q.weight": "model.layers.0.q.weight", "layers.1.q.weight": "model.layers.1.q.weight",
        "norm.weight": "model.norm.weight"}
    assert match_names(dst, dst) == {d: d for d in dst}
    m = match_names(["transformer.h.0.attn.c_attn.weight", "score.weight"], ["h.0.attn.c_attn.weight"])
    assert m == {"transformer.h.0.attn.c_attn.weight": "h.0.attn.c_attn.weight"}
    assert match_names(["a.b.weight"], ["x.y.weight"]) == {}


# ------------------------------------------------------------------------------------------------------
# FullExpert
# ------------------------------------------------------------------------------------------------------
def test_full_expert_delta_exact(tmp_path):
    base = tiny_llama()
    base_sd = sd_of(base)
    expert = perturbed(tiny_llama())
    expert.save_pretrained(tmp_path / "e", max_shard_size="20KB")
    fe = FullExpert(tmp_path / "e")
    assert fe.name == "e"
    fe.bind({k: tuple(v.shape) for k, v in base_sd.items()})
    assert fe.param_names() == set(base_sd)
    esd = expert.state_dict()
    for k, b in base_sd.items():
        d = fe.delta(k, b)
        assert d.dtype == torch.float32
        assert torch.equal(d, esd[k] - b)
        assert torch.equal(fe.tensor(k, b), esd[k])
        assert torch.equal(fe.delta(k, b.to(torch.bfloat16)), esd[k] - b.to(torch.bfloat16).float())
    assert fe.unmatched_keys == [] and fe.missing_params == []


def test_full_expert_bin(tmp_path):
    base_sd = sd_of(tiny_llama())
    esd = sd_of(perturbed(tiny_llama()))
    (tmp_path / "e").mkdir()
    torch.save(esd, tmp_path / "e" / "pytorch_model.bin")
    fe = FullExpert(tmp_path / "e", name="bin-expert")
    fe.bind({k: v.shape for k, v in base_sd.items()})
    for k, b in base_sd.items():
        assert torch.equal(fe.delta(k, b), esd[k] - b)
    # the cached mmap-ed tensors were not modified by delta()
    for k, b in base_sd.items():
        assert torch.equal(fe.delta(k, b), esd[k] - b)


def test_full_expert_prefix_and_untied_head(tmp_path, caplog):
    base_sd = sd_of(tiny_llama())
    expert = perturbed(tiny_llama())
    expert.model.save_pretrained(tmp_path / "inner")  # LlamaModel: "layers.0...", no lm_head
    fe = FullExpert(tmp_path / "inner")
    with caplog.at_level(logging.WARNING):
        fe.bind({k: v.shape for k, v in base_sd.items()})
    assert fe.mapping["model.layers.0.self_attn.q_proj.weight"] == "layers.0.self_attn.q_proj.weight"
    assert "lm_head.weight" not in fe.param_names()
    assert fe.missing_params == ["lm_head.weight"]
    assert fe.delta("lm_head.weight", base_sd["lm_head.weight"]) is None
    esd = expert.state_dict()
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(fe.delta(k, base_sd[k]), esd[k] - base_sd[k])
    assert "absent" not in caplog.text  # a missing untied head only is not worth a warning


def test_full_expert_tied_head_absent(tmp_path):
    base = tiny_gpt2()
    base_sd = sd_of(base)
    expert = perturbed(tiny_gpt2())
    expert.save_pretrained(tmp_path / "g")
    with CheckpointReader(tmp_path / "g") as r:
        saved = set(r.keys())
    fe = FullExpert(tmp_path / "g")
    fe.bind({k: v.shape for k, v in base_sd.items()})
    esd = expert.state_dict()
    assert "lm_head.weight" in fe.param_names()
    if "lm_head.weight" not in saved:
        assert fe.mapping["lm_head.weight"] == "transformer.wte.weight"
    for k, b in base_sd.items():
        d = fe.delta(k, b)
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        assert d is not None, k
        torch.testing.assert_close(d, esd[k] - b, atol=0, rtol=0)


def test_full_expert_unmatched_keys_warned(tmp_path, caplog):
    base_sd = sd_of(tiny_llama())
    esd = sd_of(perturbed(tiny_llama()))
    esd["score.weight"] = torch.randn(3, 32)
    (tmp_path / "e").mkdir()
    torch.save(esd, tmp_path / "e" / "pytorch_model.bin")
    fe = FullExpert(tmp_path / "e")
    with caplog.at_level(logging.WARNING):
        fe.bind({k: v.shape for k, v in base_sd.items()})
    assert fe.unmatched_keys == ["score.weight"]
    assert "score.weight" in caplog.text


@pytest.mark.parametrize("expert_vocab", [120, 136])
def test_full_expert_vocab_mismatch(tmp_path, expert_vocab, caplog):
    base_sd = sd_of(tiny_llama(vocab=128))
    expert = perturbed(tiny_llama(vocab=128))
    expert.resize_token_embeddings(expert_vocab)
    expert.save_pretrained(tmp_path / "e")
    esd = expert.state_dict()
    assert esd["model.embed_tokens.weight"].shape[0] == expert_vocab
    fe = FullExpert(tmp_path / "e")
    with caplog.at_level(logging.WARNING):
        fe.bind({k: v.shape for k, v in base_sd.items()})
    assert set(fe.vocab_mismatch) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "vocabulary" in caplog.text
    n = min(128, expert_vocab)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        b = base_sd[k]
        d = fe.delta(k, b)
        assert d.shape == b.shape
        assert torch.equal(d[:n], esd[k][:n] - b[:n])
        assert torch.count_nonzero(d[n:]) == 0
        t = fe.tensor(k, b)
        assert t.shape == b.shape
        assert torch.equal(t[:n], esd[k][:n]) and torch.equal(t[n:], b[n:])


def test_full_expert_shape_mismatch(tmp_path):
    base_sd = sd_of(tiny_llama(hidden=32))
    tiny_llama(hidden=48).save_pretrained(tmp_path / "big")
    fe = FullExpert(tmp_path / "big")
    with pytest.raises(CheckpointError) as e:
        fe.bind({k: v.shape for k, v in base_sd.items()})
    msg = str(e.value)
    assert "big" in msg and "48" in msg and "32" in msg and "\n" not in msg


def test_full_expert_no_common_tensor(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "g")
    fe = FullExpert(tmp_path / "g")
    with pytest.raises(CheckpointError, match="no tensor in common"):
        fe.bind({k: v.shape for k, v in tiny_llama().state_dict().items()})


def test_full_expert_truncated(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "e")
    f = tmp_path / "e" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=str(f).replace(".", r"\.")):
        FullExpert(tmp_path / "e")
    shutil.rmtree(tmp_path / "e")
