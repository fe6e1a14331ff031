"""Runner behaviours: architecture and expert kinds follow the models given, budgets around the merge,
kit classes on machines without a GPU, library use of the runner."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_merging.model import tiny
from llm_merging.core.budget import Budget
from llm_merging.main import main
from llm_merging.pipeline import RunConfig, Runner


def _report(path):
    return json.loads(path.read_text())


def test_generic_method_on_an_encoder_decoder_base(tmp_path):
    models = [str(tiny.lora_expert_dir("encoder_decoder", i)) for i in range(2)]
    assert main(["-m", "ties_merge", "--quiet", "--output_folder", str(tmp_path), "--base-model",
                 str(tiny.base_dir("encoder_decoder")), "--models", *models, "--max-examples", "2",
                 "--dataset_filepaths", *tiny.sample_data_files()[:2], "--save", "none"]) == 0
    report = _report(tmp_path / "ties_merge" / "report.json")
    assert report["architecture"] == "encoder_decoder" and report["status"] == "ok"


def test_class_with_fixed_is_peft_takes_the_other_kind_of_models(tmp_path):
    adapters = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]
    assert main(["-m", "tiny_llama_avg", "--tiny", "--quiet", "--output_folder", str(tmp_path), "--no-eval",
                 "--save", "none", "--models", *adapters]) == 0
    report = _report(tmp_path / "tiny_llama_avg" / "report.json")
    assert [e["kind"] for e in report["models"]["experts"]] == ["lora", "lora"]


def test_kit_class_runs_with_tiny(tmp_path):
    assert main(["-m", "kit_classes:KitLoraAvg", "--tiny", "--quiet", "--output_folder", str(tmp_path),
                 "--max-examples", "1", "--save", "kit"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPU")
def test_kit_class_hard_coding_cuda_falls_back_to_cpu(tmp_path, caplog):
    models = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    assert main(["-m", "kit_classes:KitCudaDevice", "--base-model", str(tiny.base_dir("decoder")), "--models",
                 *models, "--quiet", "--no-eval", "--output_folder", str(tmp_path)]) == 0
    assert "using the CPU" in caplog.text


def test_hf_dataset_spec_is_handed_to_the_loader(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    code = main(["-m", "linear", "--tiny", "--quiet", "--output_folder", str(tmp_path / "out"),
                 "--dataset_filepaths", "hf:someone/absent-dataset"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "absent-dataset" in err[0] and "does not exist" not in err[0], err


class _Flag(Budget):
    """A budget that expires when ``when(runner)`` becomes true."""

    def __init__(self, when):
        super().__init__(3600)
        self.when, self.runner = when, None

    def remaining(self):
        return -1.0 if self.runner is not None and self.when(self.runner) else super().remaining()


def _run_with(tmp_path, when):
    cfg = RunConfig(method="linear", tiny=True, output_folder=str(tmp_path), progress=False,
                    dataset_filepaths=tiny.sample_data_files()[:1])
    budget = _Flag(when)
    runner = Runner(cfg, budget=budget)
    budget.runner = runner
    return runner.run(), runner


def test_budget_spent_during_merge_stops_it(tmp_path):
    code, runner = _run_with(tmp_path, lambda r: r.method is not None and r.method.base_model is not None)
    assert code == 3 and "while merging" in runner.report["error"]
    assert not (tmp_path / "linear" / "merged_model").exists()
    assert _report(tmp_path / "linear" / "report.json")["partial"] is True


def test_budget_spent_right_after_merge_still_saves_the_model(tmp_path):
    code, runner = _run_with(tmp_path, lambda r: "merge_stats" in r.report)
    assert code == 3 and "before the evaluate phase" in runner.report["error"]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "linear" / "merged_model"))
    assert merged.num_parameters() > 0


def test_library_runner_budget_starts_now(tmp_path):
    runner = Runner(RunConfig(method="linear", tiny=True, output_folder=str(tmp_path), time_budget=30))
    assert runner.budget.elapsed() < 5


@pytest.mark.parametrize("stored, expected", [("float16", torch.float16), ("bfloat16", torch.bfloat16),
                                              ("float32", torch.bfloat16)])
def test_auto_dtype_on_gpu_keeps_the_checkpoints_half_precision(tmp_path, monkeypatch, stored, expected):
    from llm_merging.merging.Linear import Linear

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": stored}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    m = Linear()
    m.base_model_name = str(tmp_path)
    m.base_ref().resolve()
    assert m.torch_dtype() == expected
    m.device = "cpu"
    assert m.torch_dtype() == torch.float32


def test_no_eval_with_a_base_without_tokenizer_merges_and_saves(tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny.base_dir("decoder"), base)
    for f in base.iterdir():
        if "token" in f.name or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            f.unlink()
    models = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    out = tmp_path / "out"
    assert main(["-m", "ties_merge", "--base-model", str(base), "--models", *models, "--no-eval", "--quiet",
                 "--output_folder", str(out)]) == 0
    report = _report(out / "ties_merge" / "report.json")
    assert "no tokenizer copied" in report["saved"]["tokenizer"]
    merged = out / "ties_merge" / "merged_model"
    assert AutoModelForCausalLM.from_pretrained(str(merged)) is not None
    assert not any("token" in f.name for f in merged.iterdir())
    # with evaluation the missing tokenizer stays a one-line error
    assert main(["-m", "ties_merge", "--base-model", str(base), "--models", *models, "--quiet",
                 "--output_folder", str(tmp_path / "out2"), "--dataset_filepaths", tiny.sample_data_files()[0]]) == 2


def test_run_options_and_their_set_aliases(tmp_path):
    from llm_merging.core.errors import ConfigError
    from llm_merging.merging.factory import instantiate

    m = instantiate("ties_merge")
    m.set_hyperparameters({"mc_scoring": "starter_kit", "adapter_rank": "4"}, from_text=True)
    assert (m.mc_scoring, m.adapter_rank) == ("starter_kit", 4)
    assert "mc_scoring" not in m.hparams and "adapter_rank" not in m.all_hyperparameters()
    with pytest.raises(ConfigError, match="mc_scoring"):
        m.set_hyperparameters({"mc_scoring": "fast"})
    out = tmp_path / "out"
    assert main(["-m", "ties_merge", "--tiny", "--quiet", "--no-eval", "--save", "none", "--mc-scoring", "starter_kit",
                 "--output_folder", str(out)]) == 0
    assert _report(out / "ties_merge" / "report.json")["options"] == {"mc_scoring": "starter_kit", "adapter_rank": None,
                                                                      "adapter_energy": None, "adapter_max_rank": None}
