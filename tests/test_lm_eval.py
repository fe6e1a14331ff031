"""--lm-eval: lm-evaluation-harness tasks on the merged model in memory (local task YAMLs over local
JSON files written here; tiny models; no hub)."""
import json
import time
import re
import sys
from pathlib import Path

import pytest

from llm_merging import lm_eval_tasks
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.model.tiny import SAMPLE_DATA_DIR

# lm-eval's multiple-choice "acc" is argmax of sum log p(continuation tokens | context), unnormalised:
# our exact kit scoring. The kit's target tokenizer appends EOS to every choice; the evaluation docs' task YAML
# (used here) adds the EOS token text to each choice so that both score the same tokens.
def _readme_task_yaml() -> str:
    readme = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text(encoding="utf-8")
    block = re.search(r"```yml\n(task: kit_mc\n.*?)```", readme, re.S).group(1)
    block = block.replace("task: kit_mc", "task: {name}")
    return re.sub(r"test: /abs/path/cosmos_qa.json.*", "test: {rows}", block)


TASK_YAML = _readme_task_yaml()


def _task_yaml(name: str, rows) -> str:
    return TASK_YAML.replace("{name}", name).replace("{rows}", str(rows))


def _rows() -> list[dict]:
    """The kit CosmosQA sample with the options' texts as answer choices (lengths differ, so a random
    tiny model does not always pick the same position)."""
    rows = []
    for line in (SAMPLE_DATA_DIR / "cosmos_qa_sample.json").read_text().splitlines():
        row = json.loads(line)
        choices = re.findall(r"^[A-D]\. (.*)$", row["input"], flags=re.M)
        assert len(choices) == 4
        rows.append({"input": row["input"], "answer_choices": choices, "label": row["label"], "target": choices[row["label"]]})
    return rows


@pytest.fixture()
def task_files(tmp_path):
    rows_path = tmp_path / "mc_rows.json"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    yaml_path = tmp_path / "tasks" / "local_mc.yaml"
    yaml_path.parent.mkdir()
    yaml_path.write_text(_task_yaml("local_mc", rows_path))
    return rows_path, yaml_path


def _run(capsys, tmp_path, *args, method="linear"):
    out = tmp_path / "out"
    code = main(["-m", method, "--tiny", "--save", "none", "--output_folder", str(out), "--quiet", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out / method


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ options

def test_parse_args_and_tasks():
    assert lm_eval_tasks.parse_args("num_fewshot=2, limit=10,batch_size=auto:2,log_samples=false") == {
        "num_fewshot": 2, "limit": 10, "batch_size": "auto:2", "log_samples": False}
    assert lm_eval_tasks.parse_args("limit=0.5") == {"limit": 0.5}
    assert lm_eval_tasks.parse_args(None) == {}
    assert lm_eval_tasks.parse_tasks(" a, b ,a,,c.yaml") == ["a", "b", "c.yaml"]
    for bad, words in (("fewshot=2", "unknown key 'fewshot'"), ("num_fewshot=-1", "num_fewshot=-1"),
                       ("limit=0", "limit=0"), ("batch_size=x", "batch_size=x"), ("num_fewshot", "KEY=VALUE"),
                       ("log_samples=maybe", "true or false")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            lm_eval_tasks.parse_args(bad)
    with pytest.raises(ConfigError, match="comma-separated"):
        lm_eval_tasks.parse_tasks(" , ")


def test_args_need_lm_eval(capsys, tmp_path):
    code, err, _ = _run(capsys, tmp_path, "--lm-eval-args", "limit=2")
    assert code == 2 and len(err) == 1 and "--lm-eval-args needs --lm-eval" in err[0]
    code, err, _ = _run(capsys, tmp_path, "--lm-eval", "x", "--lm-eval-args", "shots=2")
    assert code == 2 and len(err) == 1 and "unknown key 'shots'" in err[0]


def test_missing_lm_eval_is_one_line_before_merging(capsys, tmp_path, monkeypatch, task_files):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    code, err, out = _run(capsys, tmp_path, "--lm-eval", str(task_files[1]))
    assert code == 2 and len(err) == 1
    assert "--lm-eval needs lm-evaluation-harness" in err[0] and 'pip install -e ".[lm-eval]"' in err[0]
    assert not out.exists()  # preflight: nothing merged, nothing written


# ------------------------------------------------------------------------------- with lm-eval installed

@pytest.mark.parametrize("method", ["linear", "flan_t5_avg"])  # a decoder, an encoder-decoder (seq2seq backend)
def test_same_accuracy_as_the_kit_file(capsys, tmp_path, task_files, method):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    code, err, out = _run(capsys, tmp_path, "-d", str(rows_path), "--lm-eval", str(yaml_path),
                          "--lm-eval-args", "batch_size=3", method=method)
    assert code == 0, err
    line = _read_jsonl(out / "scores.jsonl")[-1]
    kit_acc, lm_acc = line["mc_rows"]["accuracy"], line["local_mc"]["acc"]
    assert kit_acc == lm_acc
    assert line["average"]["score"] == pytest.approx(kit_acc, abs=1e-3)

    # the same choice scores, document by document (lm-eval's own per-document records)
    kit = _read_jsonl(out / "predictions" / "mc_rows.jsonl")
    samples = sorted(_read_jsonl(out / "lm_eval" / "samples_local_mc.jsonl"), key=lambda s: s["doc_id"])
    assert len(samples) == len(kit) == 6
    for k, s in zip(kit, samples):
        lm_scores = [r[0][0] for r in s["resps"]]
        assert lm_scores == pytest.approx(k["answer_choices_scores"], abs=2e-4)
        assert s["acc"] == float(k["predicted_choice"] == k["label"])
    assert len({k["predicted_choice"] for k in kit}) > 1  # the rows tell the choices apart

    results = json.loads((out / "lm_eval" / "results.json").read_text())  # lm-eval's own format
    assert results["results"]["local_mc"]["acc,none"] == pytest.approx(
        sum(k["predicted_choice"] == k["label"] for k in kit) / len(kit))
    assert results["n-samples"]["local_mc"] == {"original": 6, "effective": 6}
    assert "samples" not in results and results["configs"]["local_mc"]["output_type"] == "multiple_choice"

    report = json.loads((out / "report.json").read_text())
    entry = next(d for d in report["evaluation"]["datasets"] if d["name"] == "local_mc")
    assert entry["source"] == "lm_eval" and entry["main_metric"] == "acc" and entry["n_evaluated"] == 6
    assert entry["batch_size"] == 3 and entry["eval_types"] == ["multiple_choice"]
    assert report["lm_eval"]["finished"] == [str(yaml_path)] and report["versions"]["lm_eval"] != "not installed"
    assert "evaluate:local_mc" in report["phases_seconds"]


def test_instead_of_the_kit_files_with_include_dir_and_limit(capsys, tmp_path, task_files):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    code, err, out = _run(capsys, tmp_path, "--lm-eval", "local_mc", "--lm-eval-include", str(yaml_path.parent),
                          "--lm-eval-args", "limit=4,num_fewshot=1,log_samples=false")
    assert code == 0, err
    line = _read_jsonl(out / "scores.jsonl")[-1]
    assert set(line) == {"local_mc", "average"}  # no kit file: the tiny sample files are not evaluated
    assert not (out / "predictions").exists() and not (out / "lm_eval" / "samples_local_mc.jsonl").exists()
    results = json.loads((out / "lm_eval" / "results.json").read_text())
    assert results["n-samples"]["local_mc"]["effective"] == 4 and results["n-shot"]["local_mc"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["lm_eval"]["args"] == {"limit": 4, "num_fewshot": 1, "log_samples": False}


def test_a_tag_reports_each_of_its_tasks(capsys, tmp_path, task_files):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    for name in ("tagged_a", "tagged_b"):
        (yaml_path.parent / f"{name}.yaml").write_text("tag:\n  - local_tag\n" + _task_yaml(name, rows_path))
    code, err, out = _run(capsys, tmp_path, "--lm-eval", "local_tag", "--lm-eval-include", str(yaml_path.parent),
                          "--lm-eval-args", "limit=2")
    assert code == 0, err
    line = _read_jsonl(out / "scores.jsonl")[-1]
    assert set(line) == {"tagged_a", "tagged_b", "average"} and line["tagged_a"] == line["tagged_b"]


def test_unknown_task_is_one_line_in_preflight(capsys, tmp_path, task_files):
    pytest.importorskip("lm_eval")
    code, err, out = _run(capsys, tmp_path, "--lm-eval", f"{task_files[1]},no_such_task_xyz")
    assert code == 2 and len(err) == 1 and "unknown task 'no_such_task_xyz'" in err[0]
    assert not out.exists()
    code, err, _ = _run(capsys, tmp_path, "--lm-eval", str(tmp_path / "missing.yaml"))
    assert code == 2 and len(err) == 1 and "missing.yaml' does not exist" in err[0]
    code, err, _ = _run(capsys, tmp_path, "--lm-eval", "x", "--lm-eval-include", str(tmp_path / "nodir"))
    assert code == 2 and len(err) == 1 and "nodir': not a directory" in err[0]


def test_task_needing_the_hub_offline_is_one_line(capsys, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # conftest sets HF_HUB_OFFLINE=1 too
    path = tmp_path / "hub_task.yaml"
    path.write_text(_task_yaml("hub_mc", "x").replace(
        "dataset_path: json", "dataset_path: someorg/not_cached_dataset").replace("dataset_kwargs:\n  data_files:\n    test: x\n", ""))
    code, err, out = _run(capsys, tmp_path, "--lm-eval", str(path))
    assert code == 2 and len(err) == 1
    assert f"task '{path}'" in err[0] and "hub is offline" in err[0] and "someorg/not_cached_dataset" in err[0]
    assert not out.exists()


def test_task_with_a_missing_data_file_is_one_line(capsys, tmp_path):
    pytest.importorskip("lm_eval")
    path = tmp_path / "no_data.yaml"
    path.write_text(_task_yaml("no_data", tmp_path / "absent.json"))
    code, err, out = _run(capsys, tmp_path, "--lm-eval", str(path))
    assert code == 2 and len(err) == 1
    assert f"--lm-eval task '{path}': cannot load it:" in err[0] and "absent.json" in err[0]
    assert not out.exists()


def test_lm_eval_needs_evaluation(capsys, tmp_path, task_files):
    code, err, _ = _run(capsys, tmp_path, "--lm-eval", str(task_files[1]), "--no-eval")
    assert code == 2 and len(err) == 1 and "drop --no-eval" in err[0]


class _Budget:
    """A budget that runs out after ``calls`` more questions once armed."""

    def __init__(self, calls=None):
        self.calls = calls

    def remaining(self):
        if self.calls is None:
            return 1e9
        self.calls -= 1
        return 1e9 if self.calls >= 0 else -1.0


def test_budget_stops_between_and_inside_tasks(tmp_path, task_files):
    pytest.importorskip("lm_eval")
    from llm_merging.merging.factory import apply_tiny, instantiate

    rows_path, yaml_path = task_files
    second = tmp_path / "second.yaml"
    second.write_text(_task_yaml("second_mc", rows_path))
    method = instantiate("linear")
    apply_tiny(method)
    method.progress = False
    method.merge()
    prepared = lm_eval_tasks.prepare(lm_eval_tasks.LMEvalConfig(tasks=[str(yaml_path), str(second)], args={"batch_size": 2}))
    lm = lm_eval_tasks.build_lm(method, prepared)

    class Counting(_Budget):  # how many questions the first task asks (one before it, one per forward)
        n = 0

        def remaining(self):
            Counting.n += 1
            return 1e9

    first_only = lm_eval_tasks.prepare(lm_eval_tasks.LMEvalConfig(tasks=[str(yaml_path)], args={"batch_size": 2}))
    run = lm_eval_tasks.run_tasks(lm, first_only, Counting())
    assert run.error is None and run.stopped_at is None and Counting.n > 2
    n_first = Counting.n

    run = lm_eval_tasks.run_tasks(lm, prepared, _Budget(n_first))  # spent before the second starts
    assert list(run.seconds) == [str(yaml_path)] and run.stopped_at == str(second)
    assert set(run.results["results"]) == {"local_mc"}

    run = lm_eval_tasks.run_tasks(lm, prepared, _Budget(n_first + 2))  # spent inside the second
    assert list(run.seconds) == [str(yaml_path)] and run.stopped_at == str(second)
    assert not method.base_model._forward_pre_hooks  # the stop hook is gone

    datasets, section = lm_eval_tasks.evaluate(method, prepared, tmp_path / "o", budget=_Budget(n_first + 2))
    assert [(d.name, d.partial, bool(d.scores)) for d in datasets] == [("local_mc", False, True), ("second_mc", True, False)]
    assert section["stopped_at"] == str(second)
    assert set(json.loads((tmp_path / "o" / "lm_eval" / "results.json").read_text())["results"]) == {"local_mc"}


def test_budget_spent_in_lm_eval_exits_3_keeping_kit_scores(capsys, tmp_path, task_files, monkeypatch):
    pytest.importorskip("lm_eval")
    from llm_merging.core import budget as budget_mod
    from llm_merging.pipeline import RunConfig, Runner

    rows_path, yaml_path = task_files
    real_build = lm_eval_tasks.build_lm

    class Armed(budget_mod.Budget):
        armed_after = None

        def remaining(self):
            if self.armed_after is not None:
                self.armed_after -= 1
                if self.armed_after < 0:
                    return -1.0
            return super().remaining()

    bud = Armed(3600, start=time.time())

    def build(*args, **kwargs):
        bud.armed_after = 1  # the check before the task passes, the first forward pass stops it
        return real_build(*args, **kwargs)

    monkeypatch.setattr(lm_eval_tasks, "build_lm", build)
    cfg = RunConfig(method="linear", tiny=True, save="none", output_folder=str(tmp_path / "out"), progress=False,
                    dataset_filepaths=[str(rows_path)], lm_eval=lm_eval_tasks.LMEvalConfig(tasks=[str(yaml_path)]))
    runner = Runner(cfg, budget=bud)
    assert runner.run() == 3
    out = tmp_path / "out" / "linear"
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] and report["lm_eval"]["stopped_at"] == str(yaml_path)
    line = _read_jsonl(out / "scores.jsonl")[-1]
    assert "accuracy" in line["mc_rows"] and line["local_mc"] == {"partial": True}
    assert not (out / "lm_eval" / "results.json").exists()


def test_lm_eval_outside_the_version_range_is_one_line(monkeypatch):
    pytest.importorskip("lm_eval")
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "0.4.9" if name == "lm_eval" else real(name))
    with pytest.raises(ConfigError, match=r"needs lm-eval>=0\.4\.12,<0\.5, found lm-eval 0\.4\.9: pip install"):
        lm_eval_tasks.require_lm_eval()


def _launch(n: int, args: list[str], timeout: float = 300) -> list:
    """``n`` processes of ``main.py args`` started as torchrun / accelerate launch start them (gloo on CPU)."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    main_py = Path(__file__).resolve().parent.parent / "llm_merging" / "main.py"
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    base.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    envs = [dict(base, WORLD_SIZE=str(n), RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(n)] if n > 1 else [base]
    procs = [subprocess.Popen([sys.executable, str(main_py), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for env in envs]
    try:
        return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_processes_shard_the_documents_and_agree_with_one(tmp_path, task_files):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    args = ["-m", "linear", "--tiny", "--save", "none", "-q", "-d", str(rows_path), "--lm-eval", str(yaml_path),
            "--lm-eval-args", "batch_size=2"]
    outs = {}
    for n in (1, 2):
        runs = _launch(n, [*args, "--output_folder", str(tmp_path / f"p{n}")])
        assert all(code == 0 for code, _ in runs), runs
        outs[n] = tmp_path / f"p{n}" / "linear"
    one, two = (_read_jsonl(outs[n] / "scores.jsonl") for n in (1, 2))
    assert one == two and len(two) == 1  # process 0 wrote the one line
    r1, r2 = (json.loads((outs[n] / "lm_eval" / "results.json").read_text()) for n in (1, 2))
    assert r1["results"]["local_mc"]["acc,none"] == r2["results"]["local_mc"]["acc,none"]
    s1, s2 = (_read_jsonl(outs[n] / "lm_eval" / "samples_local_mc.jsonl") for n in (1, 2))
    assert [s["doc_id"] for s in s2] == [s["doc_id"] for s in s1] == list(range(6))
    for a, b in zip(s1, s2):  # the same documents; log-likelihoods up to batch-composition rounding
        assert a["acc"] == b["acc"]
        assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
    report = json.loads((outs[2] / "report.json").read_text())
    assert report["lm_eval"]["finished"] == [str(yaml_path)]


def test_search_scores_candidates_on_lm_eval_tasks(capsys, tmp_path, task_files):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    out = tmp_path / "out"
    code = main(["-m", "task_arithmetic", "--tiny", "--save", "none", "--output_folder", str(out), "--quiet",
                 "--search", "scale=0.2:1.5", "--trials", "3", "--search-lm-eval", str(yaml_path), "--search-examples", "5",
                 "--lm-eval", str(yaml_path), "--lm-eval-args", "batch_size=4"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "task_arithmetic" / "report.json").read_text())
    search = report["search"]
    assert search["search_lm_eval"] == {"tasks": [str(yaml_path)], "args": {"batch_size": 4, "limit": 5}}
    assert search["optimistic"]  # the same task is evaluated at the end
    best = search["best"]
    assert set(best["scores"]) == {"local_mc"}
    # the final model is the best candidate: its accuracy on the same 5 documents is the best trial's value
    samples = _read_jsonl(out / "task_arithmetic" / "lm_eval" / "samples_local_mc.jsonl")
    assert len(samples) == 6
    assert best["value"] == pytest.approx(sum(s["acc"] for s in samples[:5]) / 5)
    header = (out / "task_arithmetic" / "search" / "trials.csv").read_text().splitlines()[0]
    assert "local_mc:acc" in header


def test_search_lm_eval_flag_errors(capsys, tmp_path, task_files):
    code, err, _ = _run(capsys, tmp_path, "--search-lm-eval", str(task_files[1]))
    assert code == 2 and len(err) == 1 and "--search-lm-eval needs --search" in err[0]
    pytest.importorskip("lm_eval")
    code, err, _ = _run(capsys, tmp_path, "--search", "--search-lm-eval", str(task_files[1]),
                        "--search-data", str(task_files[0]))
    assert code == 2 and len(err) == 1 and "--search-lm-eval and --search-data" in err[0]


def test_a_task_failing_while_evaluating_keeps_the_finished_ones(capsys, tmp_path, task_files, monkeypatch):
    pytest.importorskip("lm_eval")
    rows_path, yaml_path = task_files
    second = tmp_path / "second.yaml"
    second.write_text(_task_yaml("second_mc", rows_path))
    real = lm_eval_tasks._simple_evaluate

    def flaky(lm, prepared, spec):
        if spec == str(second):
            raise RuntimeError("metric needs an extra package\nsecond line")
        return real(lm, prepared, spec)

    monkeypatch.setattr(lm_eval_tasks, "_simple_evaluate", flaky)
    code, err, out = _run(capsys, tmp_path, "-d", str(rows_path), "--lm-eval", f"{yaml_path},{second}")
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: --lm-eval task '{second}' failed: RuntimeError: metric needs an extra package"
    line = _read_jsonl(out / "scores.jsonl")[-1]
    assert "accuracy" in line["mc_rows"] and "acc" in line["local_mc"] and line["second_mc"] == {"partial": True}
    assert set(json.loads((out / "lm_eval" / "results.json").read_text())["results"]) == {"local_mc"}
