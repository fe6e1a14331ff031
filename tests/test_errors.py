"""Every user mistake: one line naming the thing at fault, a non-zero exit, no partial output."""
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from llm_merging.model import tiny
from llm_merging.main import main


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _run(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = main(["--output_folder", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def foreign_adapter(tmp_path_factory):
    """An adapter trained on a differently sized Llama: shapes do not fit the tiny base."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
    path = tmp_path_factory.mktemp("foreign") / "adapter"
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def unrelated_adapter(tmp_path_factory):
    """An adapter whose target modules do not exist in the base (GPT-2 names)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    path = tmp_path_factory.mktemp("unrelated") / "adapter"
    peft_model.save_pretrained(str(path))
    return str(path)


def _tiny_args():
    return ["--base-model", str(tiny.base_dir("decoder")), "--models", str(tiny.lora_expert_dir("decoder", 0))]


CASES = {
    "unknown method": (["-m", "nosuch_merge", "--tiny"], "unknown merge method 'nosuch_merge'"),
    "missing local model": (["-m", "ties_merge", "--tiny", "--base-model", "/nonexistent/base"],
                            "model directory '/nonexistent/base' does not exist"),
    "hub model offline": (["-m", "ties_merge", "--tiny", "--models", "some-org/not-cached-model"],
                          "model 'some-org/not-cached-model' is not a local directory and not in the Hugging Face cache"),
    "eval_types length": (["-m", "ties_merge", "--tiny", "--eval_types", "generation"],
                          "--eval_types has 1 values but --dataset_filepaths has 3 files"),
    "unknown set key": (["-m", "ties_merge", "--tiny", "--set", "densty=0.3"], "unknown hyperparameter 'densty'"),
    "wrong value type": (["-m", "ties_merge", "--tiny", "--set", "density=abc"], "--set density=abc: expected float"),
    "density out of range": (["-m", "ties_merge", "--tiny", "--set", "density=1.5"], "'density'=1.5 out of range"),
    "wrong list length": (["-m", "ties_merge", "--tiny", "--set", "density=0.1,0.2,0.3"],
                          "'density' has 3 values but there are 2 models"),
    "bad choice": (["-m", "ties_merge", "--tiny", "--set", "sign_method=median"], "'sign_method' must be one of"),
    "budget not positive": (["-m", "ties_merge", "--tiny", "--time-budget", "0"], "--time-budget must be positive"),
    "bad device": (["-m", "ties_merge", "--tiny", "--device", "tpu9"], "--device 'tpu9'"),
    "batch size": (["-m", "ties_merge", "--tiny", "--batch-size", "0"], "--batch-size must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_option_and_model_errors(case, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args, message = CASES[case]
    code, err, out = _run(capsys, tmp_path, *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _files(out) == []


def test_adapter_shape_mismatch(capsys, tmp_path, foreign_adapter):
    code, err, out = _run(capsys, tmp_path, "-m", "ties_merge", "--base-model", str(tiny.base_dir("decoder")),
                          "--models", foreign_adapter, "--no-eval")
    assert code == 2 and len(err) == 1, err
    assert "q_proj" in err[0] and "(64, 64)" in err[0] and "48" in err[0]
    assert _files(out) == []


def test_adapter_without_common_module(capsys, tmp_path, unrelated_adapter):
    code, err, out = _run(capsys, tmp_path, "-m", "ties_merge", "--base-model", str(tiny.base_dir("decoder")),
                          "--models", unrelated_adapter, "--no-eval")
    assert code == 2 and len(err) == 1, err
    assert "no module in common" in err[0].lower() or "no target module" in err[0].lower(), err
    assert _files(out) == []


def test_truncated_safetensors(capsys, tmp_path):
    broken = tmp_path / "broken-expert"
    shutil.copytree(tiny.full_expert_dir("decoder", 0), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err, out = _run(capsys, tmp_path, "-m", "linear", "--base-model", str(tiny.base_dir("decoder")),
                          "--models", str(broken), "--no-eval")
    assert code == 2 and len(err) == 1, err
    assert "model.safetensors" in err[0] and "broken-expert" in err[0]
    assert _files(out) == []


DATA_CASES = {
    "empty file": ("empty.json", "", "empty"),
    "malformed json line": ("bad.json", '{"input": "a", "target": "b"}\n{"input": oops}\n', "line 2"),
    "csv without input": ("noinput.csv", "id,text\n0,hello\n", "input"),
    "unparsable answer_choices": ("choices.csv", 'id,input,answer_choices\n0,q,"[\'a\', \'b\'"\n', "answer_choices"),
    "label out of range": ("label.json", '{"input": "q", "answer_choices": ["a", "b"], "label": 5}\n', "label"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_errors(case, capsys, tmp_path):
    name, content, needle = DATA_CASES[case]
    path = _write(tmp_path / name, content)
    code, err, out = _run(capsys, tmp_path, "-m", "ties_merge", "--tiny", "--dataset_filepaths", path)
    assert code == 2 and len(err) == 1, err
    assert name in err[0] and needle in err[0], err
    assert _files(out) == []


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code = main(["-m", "ties_merge", "--tiny", "--quiet", "--output_folder", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not writable" in err[0] and "file.txt" in err[0]


def test_nan_from_a_merge_names_the_parameter(capsys, tmp_path):
    code, err, out = _run(capsys, tmp_path, "-m", "kit_classes:NanMerge", "--tiny", "--no-eval")
    assert code == 2 and len(err) == 1
    assert "NaN or Inf in parameter 'model.layers.0.self_attn.q_proj.weight'" in err[0]
    # the report (json, and html with its time-per-phase plot) says what failed; no model was written
    assert _files(out) == ["NanMerge/plots/time_per_phase.png", "NanMerge/report.html", "NanMerge/report.json"]
    report = json.loads((out / "NanMerge" / "report.json").read_text())
    assert report["status"] == "error" and report["exit_status"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_cuda_requested_without_gpu(capsys, tmp_path):
    code, err, out = _run(capsys, tmp_path, "-m", "ties_merge", "--tiny", "--device", "cuda")
    assert code == 2 and err == ["error: --device cuda: no GPU is available on this machine (use --device cpu)"]
    assert _files(out) == []
