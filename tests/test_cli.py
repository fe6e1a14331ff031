"""End-to-end CLI runs on tiny offline models."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from llm_merging.model import tiny
from llm_merging.main import main

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `python llm_merging/main.py -m ties_merge --tiny` process."""
    out = tmp_path_factory.mktemp("cli")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "llm_merging", "main.py"), "-m", "ties_merge", "--tiny",
         "--output_folder", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    return proc, out / "ties_merge"


def test_tiny_run_exits_zero_with_summary(tiny_run):
    proc, _ = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert "ties_merge: ok" in proc.stdout
    assert "cosmos_qa_sample" in proc.stdout


def test_tiny_run_writes_every_output(tiny_run):
    _, d = tiny_run
    names = ["cosmos_qa_sample", "xsum_sample", "test_sample"]
    for n in names:
        rows = [json.loads(line) for line in (d / "predictions" / f"{n}.jsonl").read_text().splitlines()]
        assert rows and all("prediction" in r for r in rows)
    mc = [json.loads(line) for line in (d / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()]
    assert len(mc) == 6 and {r["prediction"] for r in mc} <= {"0", "1", "2", "3", 0, 1, 2, 3}
    scores = [json.loads(line) for line in (d / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 1
    flat = json.dumps(scores[0])
    assert "accuracy" in flat and "rouge" in flat.lower()
    with open(d / "test_sample_submission.csv", newline="") as f:
        sub = list(csv.DictReader(f))
    assert [r["id"] for r in sub] == ["0", "1", "2", "3", "4"]
    assert all(r["prediction"] != "" or r["id"] in ("1", "4") for r in sub)


def test_tiny_run_report(tiny_run):
    _, d = tiny_run
    report = json.loads((d / "report.json").read_text())
    assert report["status"] == "ok" and report["exit_status"] == 0 and report["partial"] is False
    assert report["method"] == "ties_merge"
    assert report["models"]["base"]["path"] == str(tiny.base_dir("decoder"))
    assert [e["kind"] for e in report["models"]["experts"]] == ["lora", "lora"]
    assert report["hyperparameters"]["density"] == 0.2 and report["hyperparameters"]["sign_method"] == "total"
    for phase in ("preflight", "load", "merge", "save", "evaluate"):
        assert report["phases_seconds"][phase] >= 0
    assert report["budget"]["seconds"] == 3600 and 0 < report["budget"]["remaining"] < 3600
    assert report["peak_rss_mib"] > 0
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["dataset_sizes"] and all(v > 0 for v in report["dataset_sizes"].values())
    assert {"torch", "transformers", "peft"} <= set(report["versions"])
    datasets = report["evaluation"]["datasets"]
    assert len(datasets) == 3 and all(ds["n_evaluated"] == ds["n_examples"] for ds in datasets)
    assert report["merge_stats"]["tensors_merged"] > 0


def test_tiny_run_saves_a_loadable_model(tiny_run):
    from transformers import AutoModelForCausalLM

    _, d = tiny_run
    merged = AutoModelForCausalLM.from_pretrained(str(d / "merged_model"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder")))
    diff = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert diff and all("proj" in n for n in diff)
    card = (d / "merged_model" / "README.md").read_text()
    assert "ties_merge" in card and "density" in card


def test_list_prints_every_method(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    from llm_merging.merging import BUILTIN_METHODS

    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(BUILTIN_METHODS) <= listed


def test_unknown_method_names_close_matches(capsys, tmp_path):
    assert main(["-m", "ties_merg", "--tiny", "--output_folder", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown merge method 'ties_merg'; did you mean ties_merge")
    assert list(tmp_path.iterdir()) == []


def _shipped_methods() -> list[str]:
    """Every built-in method once (aliases of the same class skipped)."""
    from llm_merging.merging import BUILTIN_METHODS

    seen, names = set(), []
    for name, target in BUILTIN_METHODS.items():
        if target not in seen:
            seen.add(target)
            names.append(name)
    return names


@pytest.mark.parametrize("method", _shipped_methods())
def test_every_shipped_method_runs_tiny(method, tmp_path):
    from llm_merging.merging import get_method_class
    from llm_merging.merging.Linear import Linear

    cls = get_method_class(method)
    # the starter kit's family (linear and its kit-default subclasses) is also evaluated
    extra = ["--max-examples", "2"] if issubclass(cls, Linear) else ["--no-eval"]
    required = [f"{k}={p.low if p.low else 0.01}" for k, p in cls.hyperparameters.items()
                if p.default is None and not p.optional]  # e.g. nearswap's t
    if required:
        extra += ["--set", *required]
    code = main(["-m", method, "--tiny", "--output_folder", str(tmp_path), "--quiet", "--save", "none", *extra])
    assert code == 0
    report = json.loads((tmp_path / method / "report.json").read_text())
    assert report["status"] == "ok"
    kinds = {e["kind"] for e in report["models"]["experts"]}
    assert kinds == ({"full"} if method == "tiny_llama_avg" else {"lora"})


def test_module_entrypoint_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llm_merging.main", "--list"], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0 and "ties_merge" in proc.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "starter_kit")),
                    reason="starter kit data not present")
def test_starter_kit_validation_files_load_and_evaluate(tmp_path):
    kit = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "starter_kit")
    files = [os.path.join(kit, f) for f in ("cosmos_qa.json", "xsum.json", "validation/cosmos_qa.csv",
                                             "validation/xsum.csv", "test.csv")]
    assert main(["-m", "linear", "--tiny", "--quiet", "--save", "none", "--max-examples", "2",
                 "--output_folder", str(tmp_path), "--dataset_filepaths", *files]) == 0
    report = json.loads((tmp_path / "linear" / "report.json").read_text())
    sizes = {os.path.basename(k): v for k, v in report["dataset_sizes"].items()}
    assert sizes["cosmos_qa.json"] == 500 and sizes["xsum.json"] == 200 and sizes["test.csv"] == 807
    assert all(d["n_evaluated"] == 2 for d in report["evaluation"]["datasets"])
    assert (tmp_path / "linear" / "test_submission.csv").exists()


def test_guarded_ctrl_c_is_one_line_and_130(capsys):
    """Ctrl-C in any command (e.g. extract-lora, moe, tokensurgeon) exits 130 with one line, no traceback."""
    from llm_merging.cli import guarded

    def work() -> int:
        raise KeyboardInterrupt

    assert guarded(work) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: interrupted (Ctrl-C)"]
