"""Merge classes written for the starter kit run unchanged on tiny local models."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm_merging.model import tiny
from llm_merging.main import main

import kit_classes


@pytest.fixture(scope="module")
def same_shape_adapters(tmp_path_factory):
    """Two adapters with the same rank and targets (the kit's averaging code needs that)."""
    root = tmp_path_factory.mktemp("kit-adapters")
    paths = []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder")))
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        gen = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        path = root / f"adapter{i}"
        peft_model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def _run(tmp_path, cls, *extra):
    return main(["-m", f"kit_classes:{cls}", "--output_folder", str(tmp_path), "--quiet",
                 "--base-model", str(tiny.base_dir("decoder")), *extra])


def test_entry_points_era_lora_class_without_is_peft(tmp_path, same_shape_adapters):
    data = [str(p) for p in tiny.sample_data_files()]
    assert _run(tmp_path, "KitLoraAvg", "--models", *same_shape_adapters, "--save", "kit",
                "--max-examples", "2", "--dataset_filepaths", *data) == 0
    out = tmp_path / "KitLoraAvg"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and [e["kind"] for e in report["models"]["experts"]] == ["lora", "lora"]
    saved = load_file(str(out / "safetensor.pt"))  # the kit's output: averaged LoRA tensors
    a = [load_file(f"{p}/adapter_model.safetensors") for p in same_shape_adapters]
    key = next(k for k in saved if "lora_A" in k)
    torch.testing.assert_close(saved[key], 0.5 * a[0][key] + 0.5 * a[1][key])


def test_kit_lora_class_full_save_equals_peft_merge(tmp_path, same_shape_adapters):
    assert _run(tmp_path, "KitLoraAvg", "--models", *same_shape_adapters, "--no-eval") == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "KitLoraAvg" / "merged_model"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    q = dict(merged.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).named_parameters())
    a = [load_file(f"{p}/adapter_model.safetensors") for p in same_shape_adapters]
    pre = "base_model.model.model.layers.1.self_attn.q_proj"
    A = 0.5 * a[0][f"{pre}.lora_A.weight"] + 0.5 * a[1][f"{pre}.lora_A.weight"]
    B = 0.5 * a[0][f"{pre}.lora_B.weight"] + 0.5 * a[1][f"{pre}.lora_B.weight"]
    torch.testing.assert_close(q, base["model.layers.1.self_attn.q_proj.weight"] + 2.0 * B @ A, rtol=1e-5, atol=1e-6)


def test_csv_era_full_model_class(tmp_path):
    models = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    data = [str(p) for p in tiny.sample_data_files()]
    assert _run(tmp_path, "KitFullAvg", "--models", *models, "--dataset_filepaths", *data, "--save", "kit") == 0
    out = tmp_path / "KitFullAvg"
    report = json.loads((out / "report.json").read_text())
    assert [e["kind"] for e in report["models"]["experts"]] == ["full", "full"]
    assert all(d["n_evaluated"] == d["n_examples"] for d in report["evaluation"]["datasets"])
    saved = load_file(str(out / "safetensor.pt"))
    e = [dict(AutoModelForCausalLM.from_pretrained(m).named_parameters()) for m in models]
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(saved[name], 0.8 * e[0][name] + 0.2 * e[1][name])
    assert (out / "test_sample_submission.csv").exists()


def test_class_overriding_predict_multiple_choice_is_used(tmp_path):
    kit_classes.AlwaysFirstChoice.calls = 0
    data = [str(p) for p in tiny.sample_data_files()]
    assert main(["-m", "kit_classes:AlwaysFirstChoice", "--tiny", "--output_folder", str(tmp_path), "--quiet",
                 "--save", "none", "--dataset_filepaths", data[0]]) == 0
    assert kit_classes.AlwaysFirstChoice.calls > 0
    rows = [json.loads(l) for l in (tmp_path / "AlwaysFirstChoice" / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(str(r["prediction"]) == "0" for r in rows)


def test_bare_string_list_models_and_hf_auth_token_unset(monkeypatch):
    monkeypatch.delenv("HF_AUTH_TOKEN", raising=False)
    m = kit_classes.KitLoraAvg("x")
    m.list_models = "single/model"
    assert [r.id for r in m.model_refs()] == ["single/model"]
    m.list_models = ["a/b@rev1", ("c/d", "rev2"), "e/f"]
    assert [(r.id, r.revision) for r in m.model_refs()] == [("a/b", "rev1"), ("c/d", "rev2"), ("e/f", None)]
    monkeypatch.setenv("HF_AUTH_TOKEN", "")
    from llm_merging.model.refs import hf_token

    assert hf_token() is None
