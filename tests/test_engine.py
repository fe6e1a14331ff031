"""The merge engine against independent computations; saved outputs reload to the same model."""
import json

import pytest
import torch
from conftest import engine_method
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_merging import ops
from llm_merging.core.errors import MergeError
from llm_merging.merging.TaskArithmetic import TaskArithmetic
from llm_merging.merging.TiesMerge import TiesMerge
from llm_merging.model import tiny
from llm_merging.model.save import AdapterWriter, save_full, save_state_dict


def _load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def sharded_experts(tmp_path_factory):
    """Two full fine-tunes written as several safetensors shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    paths = []
    for i in range(2):
        model = _load(tiny.full_expert_dir("decoder", i))
        path = root / f"expert{i}"
        model.save_pretrained(str(path), max_shard_size="100KB")
        paths.append(path)
    assert len(list(paths[0].glob("*.safetensors"))) > 1 and (paths[0] / "model.safetensors.index.json").exists()
    return paths


def test_streamed_full_merge_equals_in_memory(sharded_experts):
    base_path = tiny.base_dir("decoder")
    m = engine_method(TaskArithmetic, base_path, sharded_experts, weights=[0.7, 0.3], scale=0.9)
    m.merge()
    base = dict(_load(base_path).named_parameters())
    experts = [dict(_load(p).named_parameters()) for p in sharded_experts]
    for name, merged in m.base_model.named_parameters():
        expected = base[name] + 0.9 * (0.7 * (experts[0][name] - base[name]) + 0.3 * (experts[1][name] - base[name]))
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def _peft_deltas(adapter_path):
    """ΔW of an adapter as PEFT itself applies it (merge_and_unload on the tiny base)."""
    base = _load(tiny.base_dir("decoder"))
    ref = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(adapter_path)).merge_and_unload()
    return {n: p.detach() - ref[n] for n, p in merged.named_parameters()}, ref


def test_lora_ties_merge_equals_independent_computation():
    adapters = [tiny.lora_expert_dir("decoder", i) for i in range(3)]
    m = engine_method(TiesMerge, tiny.base_dir("decoder"), adapters, density=[0.5, 0.3, 0.8], scale=1.2)
    m.merge()
    deltas = []
    for a in adapters:
        d, ref = _peft_deltas(a)
        deltas.append(d)
    changed = 0
    for name, merged in m.base_model.named_parameters():
        tvs = [d[name] for d in deltas]
        if all(torch.count_nonzero(t) == 0 for t in tvs):
            torch.testing.assert_close(merged, ref[name])
            continue
        changed += 1
        expected = ref[name] + ops.ties(tvs, density=[0.5, 0.3, 0.8], scale=1.2)
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)
    assert changed > 0


def test_saved_full_model_and_adapter_reload_to_the_same_logits(tmp_path):
    adapters = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    m = engine_method(TaskArithmetic, tiny.base_dir("decoder"), adapters, weights=[0.6, 0.4])
    m.delta_sink = AdapterWriter()
    m.merge()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        want = m.base_model(ids).logits
    full = save_full(m.base_model, None, tmp_path / "full", {"method": "task_arithmetic"})
    with torch.no_grad():
        torch.testing.assert_close(_load(full)(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(m.delta_sink, AdapterWriter)
    path = m.delta_sink.save(tmp_path / "adapter", str(tiny.base_dir("decoder")))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(_load(tiny.base_dir("decoder")), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_truncated_adapter_rank_is_the_best_low_rank_approximation(tmp_path):
    adapters = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    m = engine_method(TaskArithmetic, tiny.base_dir("decoder"), adapters)
    m.set_hyperparameters({"adapter_rank": 2})  # the run option, through its --set alias
    m.delta_sink = AdapterWriter(rank=m.adapter_rank)
    m.merge()
    writer = m.delta_sink
    name = "model.layers.0.self_attn.q_proj"
    b, a = writer.factors[name]
    assert a.shape[0] == 2
    base = dict(_load(tiny.base_dir("decoder")).named_parameters())[name + ".weight"]
    delta = dict(m.base_model.named_parameters())[name + ".weight"] - base
    u, s, vh = torch.linalg.svd(delta.detach())
    torch.testing.assert_close(b @ a, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)


def test_save_state_dict_handles_tied_and_non_contiguous(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 6)
    v = torch.randn(6, 3)
    state = {"embed.weight": w, "lm_head.weight": w, "t.weight": w.t(), "x": torch.arange(3.0),
             "top": v[:2], "bottom": v[2:]}  # two views of one storage
    save_state_dict(state, tmp_path / "safetensor.pt")
    loaded = load_file(str(tmp_path / "safetensor.pt"))
    assert set(loaded) == {"embed.weight", "t.weight", "x", "top", "bottom"}
    torch.testing.assert_close(loaded["t.weight"], w.t())
    torch.testing.assert_close(torch.cat([loaded["top"], loaded["bottom"]]), v)
    assert not list(tmp_path.glob(".*"))


def test_nan_from_a_merge_names_the_parameter():
    class Broken(TaskArithmetic):
        def merge_tensor(self, name, base, task_vectors):
            return torch.full_like(base, float("nan"))

    m = engine_method(Broken, tiny.base_dir("decoder"), [tiny.lora_expert_dir("decoder", 0)])
    with pytest.raises(MergeError, match=r"NaN or Inf in parameter 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        m.merge()
