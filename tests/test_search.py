"""--search: space syntax and checks, in-memory candidates equal to the engine's merge, a planted optimum,
seeded and resumed studies, two workers on one journal, the budget, outputs, and one-line bad-input errors."""
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from llm_merging.model import tiny
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.merging import settings
from llm_merging.merging.Merges import Merges
from llm_merging.merging.factory import instantiate
from llm_merging.pipeline import RunConfig, Runner
from llm_merging.search import SearchConfig
from llm_merging.search.candidates import Fitness, InMemoryMerger
from llm_merging.search.space import build_space, candidate_values, parse_entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAM = "model.layers.0.self_attn.q_proj.weight"  # changed by both tiny LoRA experts


def _method(name, experts, values=None):
    m = instantiate(name)
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.is_peft, m.device, m.progress = list(experts), None, "cpu", False
    m.set_hyperparameters(values or {})
    m.preflight()
    return m


def _search(tmp_path, method="task_arithmetic", entries=(), *, methods=None, out="out", evaluate=False, save="none",
            budget=600.0, overrides=None, **search):
    cfg = RunConfig(method=method, tiny=True, output_folder=str(tmp_path / out), evaluate=evaluate, save=save,
                    progress=False, device="cpu", time_budget=budget, overrides=dict(overrides or {}),
                    search=SearchConfig(entries=list(entries), methods=methods or [method], **search))
    runner = Runner(cfg)
    return runner.run(), runner


def _trials(runner):
    with open(os.path.join(runner.report["search"]["dir"], "trials.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _planted(target_w0=0.3):
    """Objective peaking where expert 0's weight is ``target_w0``: minus the distance of one merged tensor
    to the same tensor merged with weights (target_w0, 1)."""
    experts = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]
    ref = _method("task_arithmetic", experts, {"weights": [target_w0, 1.0]})
    ref.merge()
    target = dict(ref.base_model.named_parameters())[PARAM].detach().clone()

    def objective(method):
        return -float((dict(method.base_model.named_parameters())[PARAM].detach() - target).norm())

    return objective


# ------------------------------------------------------------------ space syntax
def test_space_syntax_and_defaults():
    specs = {"ties_merge": instantiate("ties_merge").all_hyperparameters(),
             "task_arithmetic": instantiate("task_arithmetic").all_hyperparameters()}
    entries = [parse_entry(e) for e in ("density=0.1:0.9", "scale=0.5:1.5:log", "sign_method=total|frequency",
                                        "ties_merge.weights[1]=0:2", "task_arithmetic.weights@3=0:1")]
    space = build_space(["ties_merge", "task_arithmetic"], specs, 2, entries)
    labels = space.describe()
    assert "method=ties_merge|task_arithmetic" in labels
    assert "ties_merge:density=0.1:0.9" in labels and "ties_merge:scale=0.5:1.5:log" in labels
    assert "ties_merge:weights[*]=0.1:1.0" not in labels and "ties_merge:weights[1]=0.0:2.0" in labels
    assert "task_arithmetic:weights@3=0.0:1.0" in labels and "task_arithmetic:density" not in " ".join(labels)
    names = [n for d in space.dims["task_arithmetic"] for n, _, _ in space.param_names("task_arithmetic", d)]
    assert "task_arithmetic.weights@2" in names
    params = {"task_arithmetic.scale": 1.0, "task_arithmetic.weights@0": 0.0, "task_arithmetic.weights@1": 0.5,
              "task_arithmetic.weights@2": 1.0}
    values = candidate_values(space, "task_arithmetic", params, {"weights": 1.0})
    assert values["weights"] == settings.Gradient((0.0, 0.5, 1.0)) and values["scale"] == 1.0
    # per expert, per anchor: [*]@2 on top of a fixed per-model list
    one = build_space(["ties_merge"], {"ties_merge": specs["ties_merge"]}, 2, [parse_entry("density[*]@2=0.1:1")])
    got = candidate_values(one, "ties_merge", {"density[0]@0": 0.2, "density[0]@1": 0.4, "density[1]@0": 0.6,
                                               "density[1]@1": 0.8, "weights[0]": 1.0, "weights[1]": 1.0,
                                               "scale": 1.0}, {})
    assert got["density"] == [settings.Gradient((0.2, 0.4)), settings.Gradient((0.6, 0.8))]
    # defaults: bounded floats, scale (log) and one weight per expert
    default = build_space(["dare_ties"], {"dare_ties": instantiate("dare_ties").all_hyperparameters()}, 3, [])
    assert set(default.describe()) == {"dare_ties:density=0.1:1.0", "dare_ties:weights[*]=0.1:1.0",
                                       "dare_ties:scale=0.5:2.0:log"}


@pytest.mark.parametrize("entry, message", [
    ("density=0:1.5", "outside the bounds of 'density'"),
    ("density=0:1", "outside the bounds of 'density'"),  # 0 is excluded: (0, 1]
    ("foo=0:1", "unknown hyperparameter 'foo'"),
    ("density=0.9:0.1", "empty range"),
    ("scale=0:2:log", "log range needs LOW > 0"),
    ("sign_method=total|sometimes", "must be one of total, frequency"),
    ("sign_method=0:1", "give choices"),
    ("scale[*]=0:1", "takes one value, not one per expert"),
    ("weights[7]=0:1", "expert index 7 out of range"),
    ("density=a:b", "is not a number"),
])
def test_space_errors(entry, message):
    specs = {"ties_merge": instantiate("ties_merge").all_hyperparameters()}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as info:
        build_space(["ties_merge"], specs, 2, [parse_entry(entry)])
    assert "\n" not in str(info.value) and entry.partition("=")[0] in str(info.value)


# ------------------------------------------------------------------ candidates == engine
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_candidate_equals_engine_merge_and_restores(kind):
    experts = [str(tiny.lora_expert_dir("decoder", i) if kind == "lora" else tiny.full_expert_dir("decoder", i))
               for i in range(3)]
    loader = _method("ties_merge", experts)
    merger = InMemoryMerger(loader, progress=False)
    assert set(merger.cache_kinds) == {"lora factors" if kind == "lora" else "task vectors"}
    base = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
    for name, values in [("ties_merge", {"density": 0.3, "weights": [0.2, 0.5, 0.9]}), ("dare_ties", {"density": 0.4})]:
        cand = _method(name, experts, values)
        merger.share_with(cand)
        cand.check_all_tensors(merger.names)
        merger.apply(cand.merge_resolved)
        got = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
        merger.restore()
        ref = _method(name, experts, values)
        ref.merge()
        for n, p in ref.base_model.named_parameters():
            assert torch.equal(got[n], p.detach()), (name, n)
        assert any(not torch.equal(got[n], base[n]) for n in base)
        for n, p in merger.model.named_parameters():
            assert torch.equal(p.detach(), base[n]), n


# ------------------------------------------------------------------ the study
def test_planted_optimum_found_and_best_recipe_reproduces_it(tmp_path):
    objective = _planted(0.3)
    status, runner = _search(tmp_path, entries=["weights[0]=0:1"], trials=20, objective=objective, overrides={"scale": "1"})
    assert status == 0, runner.report.get("error")
    rep = runner.report["search"]
    assert rep["trials"]["total"] == 20 and rep["stopped_because"] == "trials"
    assert abs(rep["best"]["params"]["weights[0]"] - 0.3) < 0.06
    # the final merge (the usual engine path) is the best candidate, and best.yml reproduces it
    assert objective(runner.method) == pytest.approx(rep["best"]["value"], abs=0)
    final = dict(runner.method.base_model.named_parameters())[PARAM].detach().clone()
    again = Runner(RunConfig(method="", recipe=rep["best"]["recipe"], output_folder=str(tmp_path / "again"),
                             evaluate=False, save="none", progress=False, device="cpu"))
    assert again.run() == 0, again.report.get("error")
    assert torch.equal(dict(again.method.base_model.named_parameters())[PARAM].detach(), final)
    out = tmp_path / "out" / "task_arithmetic" / "search"
    for f in ("trials.csv", "best.yml", "history.png", "importance.png", "journal.log"):
        assert (out / f).is_file(), f
    assert rep["importance"] and set(rep["importance"]) == {"weights[0]"}
    rows = _trials(runner)
    assert len(rows) == 20 and {r["state"] for r in rows} == {"complete"}


def test_seeded_runs_give_the_same_trials_and_resume_continues(tmp_path):
    objective = _planted(0.6)
    kw = dict(methods=["task_arithmetic", "ties_merge"], entries=["scale=0.5:1.5", "ties_merge.sign_method=total|frequency"],
              objective=objective)
    runs = []
    for out in ("a", "b"):
        status, runner = _search(tmp_path, out=out, trials=5, **kw)
        assert status == 0, runner.report.get("error")
        runs.append([{k: v for k, v in r.items() if k not in ("seconds", "merge_seconds", "eval_seconds", "worker")}
                     for r in _trials(runner)])
    assert runs[0] == runs[1] and len(runs[0]) == 5
    assert len({r["method"] for r in runs[0]}) >= 1 and "ties_merge.sign_method" in runs[0][0]
    status, runner = _search(tmp_path, out="a", trials=8, resume=True, **kw)
    assert status == 0, runner.report.get("error")
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "merge_seconds", "eval_seconds", "worker")}
            for r in _trials(runner)]
    assert [r["number"] for r in rows] == [str(i) for i in range(8)]
    assert rows[:5] == runs[0]  # the first five are kept, not re-run
    assert runner.report["search"]["trials_before"] == 5 and runner.report["search"]["trials_this_worker"] <= 3
    first = {tuple(sorted((k, v) for k, v in r.items() if k not in ("number", "value", "state"))) for r in rows[:5]}
    assert any(tuple(sorted((k, v) for k, v in r.items() if k not in ("number", "value", "state"))) not in first
               for r in rows[5:])


def test_grid_stops_when_exhausted_and_cmaes_runs(tmp_path):
    objective = _planted(0.5)
    status, runner = _search(tmp_path, "ties_merge", ["scale=0.5:1.5", "sign_method=total|frequency", "density=0.5|1.0",
                                                      "weights=1.0"], sampler="grid", grid_points=2, objective=objective)
    assert status == 0, runner.report.get("error")
    rep = runner.report["search"]
    assert rep["stopped_because"].startswith("space exhausted")
    combos = {(r["scale"], r["sign_method"], r["density"]) for r in _trials(runner) if r["cached"] == "False"}
    assert len(combos) == 8
    status, runner = _search(tmp_path, out="cma", entries=["weights[*]=0:1", "scale=0.5:1.5"], sampler="cmaes", trials=6,
                             objective=objective)
    assert status == 0 and runner.report["search"]["trials"]["complete"] == 6


def test_recipe_search_section(tmp_path):
    experts = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {tiny.base_dir('decoder')}\nmodels:\n"
        f"  - model: {experts[0]}\n  - model: {experts[1]}\n"
        "llm_merging:\n  search:\n    weights[0]: '0:1'\n    scale: [0.5, 1.0]\n", encoding="utf-8")
    cfg = RunConfig(method="", recipe=str(recipe), output_folder=str(tmp_path / "out"), evaluate=False, save="none",
                    progress=False, device="cpu", search=SearchConfig(trials=3, objective=_planted(0.3)))
    runner = Runner(cfg)
    assert runner.run() == 0, runner.report.get("error")
    assert runner.report["search"]["space"] == ["task_arithmetic:weights[*]=0.1:1.0", "task_arithmetic:scale=0.5|1.0",
                                                "task_arithmetic:weights[0]=0.0:1.0"] or \
        set(runner.report["search"]["space"]) >= {"task_arithmetic:weights[0]=0.0:1.0", "task_arithmetic:scale=0.5|1.0"}


def test_fitness_prunes_on_the_first_slice():
    class Fake:
        name = "fake"

        def __init__(self):
            self.calls = 0

        def predict_multiple_choice(self, batch):
            self.calls += len(batch["input"])
            return [0] * len(batch["input"]), [[0.0, -1.0]] * len(batch["input"])

    rows = [{"input": f"q{i}", "answer_choices": ["a", "b"], "label": i % 2, "eval_type": "multiple_choice"}
            for i in range(10)]
    fit = Fitness(["f"], [rows], [3], batch_size=4)
    method = Fake()
    out = fit.evaluate(method, report=lambda v: True)
    assert out["pruned"] and method.calls == 3
    method = Fake()
    out = fit.evaluate(method, report=lambda v: False)
    assert not out["pruned"] and method.calls == 10 and out["value"] == pytest.approx(0.5)
    fit.baselines = [0.25]
    assert fit.evaluate(Fake())["value"] == pytest.approx(2.0)


def test_budget_is_honoured_with_real_fitness_and_normalize(tmp_path):
    cfg = RunConfig(method="task_arithmetic", tiny=True, output_folder=str(tmp_path / "out"), max_examples=1,
                    progress=False, device="cpu", time_budget=40.0,
                    search=SearchConfig(examples=2, normalize=True, prune=False))
    t0 = time.time()
    runner = Runner(cfg)
    status = runner.run()
    assert status == 0, runner.report.get("error")
    assert time.time() - t0 < 40.0 and runner.report["budget"]["remaining"] > 0
    rep = runner.report["search"]
    assert rep["stopped_because"] == "budget" and rep["trials"]["complete"] >= 1
    assert rep["optimistic"] and "optimistic" in rep["note"]
    assert set(rep["expert_scores"]) == {e["id"] for e in runner.report["models"]["experts"]}
    best = rep["best"]
    primary = {f: best["scores"][f]["accuracy" if "cosmos" in f else "rougeL"] for f in best["scores"]}
    ratios = [v / rep["normalized_by"][f] if rep["normalized_by"][f] > 0 else v for f, v in primary.items()]
    assert best["value"] == pytest.approx(sum(ratios) / len(ratios))
    assert runner.report["saved"]["format"] == "full" and runner.report["evaluation"]["datasets"]


def test_two_workers_share_one_journal(tmp_path):
    journal = tmp_path / "shared" / "study.log"
    cmd = [sys.executable, os.path.join(REPO, "llm_merging", "main.py"), "-m", "task_arithmetic", "--tiny", "-q",
           "--device", "cpu", "--no-eval", "--save", "none", "--search", "--search-examples", "1", "--no-prune",
           "--trials", "4", "--search-storage", f"journal:{journal}"]
    env = dict(os.environ)
    procs = [subprocess.Popen(cmd + ["--output_folder", str(tmp_path / f"w{i}")], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-2000:]
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers))) and 4 <= len(numbers) <= 5
    # both workers usually contribute, but one that starts late may find the study's trials already taken
    assert 1 <= len({t.user_attrs.get("worker") for t in study.trials}) <= 2
    reports = [json.loads((tmp_path / f"w{i}" / "task_arithmetic" / "report.json").read_text()) for i in range(2)]
    assert sum(r["search"]["trials_this_worker"] for r in reports) == len(numbers)


# ------------------------------------------------------------------ bad input: one line, before any weight
@pytest.mark.parametrize("args, message", [
    (["-m", "model_stock", "--search"], "empty search space"),
    (["-m", "ties_merge", "--search", "density=0:1.5"], "outside the bounds of 'density'"),
    (["-m", "ties_merge", "--search", "foo=0:1"], "unknown hyperparameter 'foo'"),
    (["-m", "ties_merge", "--search", "--search-data", "TEST_CSV"], "have no label"),
    (["-m", "ties_merge", "--search", "--search-data", "missing.json"], "does not exist"),
    (["-m", "ties_merge", "--search", "--resume"], "--resume: no search journal"),
    (["-m", "ties_merge", "task_arithmetic"], "several methods need --search"),
    (["-m", "ties_merge", "--trials", "3"], "--trials needs --search"),
    (["-m", "ties_merge", "task_arithmetic", "--search", "--set", "dare_ties.density=0.3"], "not one of -m"),
    (["-m", "ties_merge", "task_arithmetic", "--search", "--set", "nope=1"], "unknown hyperparameter for every method"),
    (["-m", "ties_merge", "--search", "--search-sampler", "bayes"], "--search-sampler must be one of"),
    (["-m", "ties_merge", "--search", "--search-storage", "redis://x"], "--search-storage"),
])
def test_bad_input_is_one_line_before_any_weight(tmp_path, capsys, monkeypatch, args, message):
    def no_weights(self):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Merges, "_load_base_model", no_weights)
    test_csv = [f for f in tiny.sample_data_files() if f.endswith(".csv")][0]
    args = [test_csv if a == "TEST_CSV" else a for a in args]
    status = main(args + ["--tiny", "--output_folder", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert message in err and len(err.splitlines()) == 1
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert written == []


def test_resume_fails_a_trial_left_running_by_a_stopped_search(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    objective = _planted(0.3)
    status, runner = _search(tmp_path, entries=["weights[0]=0:1"], trials=2, objective=objective)
    assert status == 0, runner.report.get("error")
    journal = tmp_path / "out" / "task_arithmetic" / "search" / "journal.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name=runner.report["search"]["study_name"], storage=storage)
    study.ask()  # what a killed search leaves behind: a trial that never finishes
    status, runner = _search(tmp_path, entries=["weights[0]=0:1"], trials=4, resume=True, objective=objective)
    assert status == 0, runner.report.get("error")
    assert [(r["number"], r["state"]) for r in _trials(runner)] == [
        ("0", "complete"), ("1", "complete"), ("2", "fail"), ("3", "complete")]


def test_values_a_recipe_sets_leave_the_default_space(tmp_path):
    from llm_merging.model import tiny
    from llm_merging.main import main

    base = tiny.base_dir("decoder")
    experts = [tiny.lora_expert_dir("decoder", i) for i in range(2)]
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                      + "".join(f"  - model: {e}\n    parameters: {{weight: 1.0}}\n" for e in experts)
                      + "parameters: {density: 0.5}\n")
    data = tiny.sample_data_files()[0]
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "--search", "--trials", "1", "--search-data", data, "--no-eval",
                 "--quiet", "--output_folder", str(out)]) == 0
    space = json.loads((out / "ties_merge" / "report.json").read_text())["search"]["space"]
    assert not any("weights" in s or "density" in s for s in space) and any("scale" in s for s in space)
