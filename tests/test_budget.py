"""The wall-clock budget: stop between batches, keep finished work, mark the report partial, exit 3."""
import json
import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from llm_merging.model import tiny
from llm_merging.core.budget import Budget
from llm_merging.pipeline import RunConfig, Runner

import kit_classes
from conftest import REPO_ROOT


class TripBudget(Budget):
    """A budget that runs out once the method has evaluated ``after`` batches."""

    def __init__(self, after):
        super().__init__(3600)
        self.after = after

    def remaining(self):
        return -1.0 if kit_classes.CountingLinear.calls >= self.after else super().remaining()


def test_budget_exhausted_during_evaluation_keeps_finished_work(tmp_path):
    kit_classes.CountingLinear.calls = 0
    cfg = RunConfig(method="kit_classes:CountingLinear", tiny=True, output_folder=str(tmp_path), batch_size=1,
                    progress=False, dataset_filepaths=tiny.sample_data_files())
    runner = Runner(cfg, budget=TripBudget(after=3))
    assert runner.run() == 3
    out = tmp_path / "CountingLinear"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "partial" and report["partial"] is True and report["exit_status"] == 3
    assert "time budget" in report["error"]
    first = report["evaluation"]["datasets"][0]
    assert first["partial"] is True and 0 < first["n_evaluated"] < first["n_examples"]
    rows = (out / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()
    assert len(rows) == first["n_evaluated"] and all("prediction" in json.loads(r) for r in rows)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged_model"))  # saved before evaluation
    assert sum(p.numel() for p in merged.parameters()) > 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary leftovers


def test_budget_too_small_for_anything_exits_3_before_merging(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "llm_merging", "main.py"), "-m", "ties_merge", "--tiny", "--quiet",
         "--time-budget", "0.5", "--output_folder", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: time budget of 0.5 s ran out before the merge phase")
    report = json.loads((tmp_path / "ties_merge" / "report.json").read_text())
    assert report["partial"] is True and report["exit_status"] == 3 and report["budget"]["remaining"] < 0


def test_ctrl_c_keeps_finished_work_and_exits_130(tmp_path, monkeypatch):
    from llm_merging.merging.Linear import Linear

    calls = {"n": 0}
    original = Linear.generate

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Linear, "generate", interrupted)
    cfg = RunConfig(method="linear", tiny=True, output_folder=str(tmp_path), batch_size=1, progress=False,
                    dataset_filepaths=tiny.sample_data_files()[:2])
    runner = Runner(cfg)
    assert runner.run() == 130
    report = json.loads((tmp_path / "linear" / "report.json").read_text())
    assert report["status"] == "partial" and report["exit_status"] == 130
    assert (tmp_path / "linear" / "predictions" / "cosmos_qa_sample.jsonl").exists()
    assert not [p for p in (tmp_path / "linear").rglob("*") if p.name.startswith(".")]
