"""Phases plug in: a phase added to the list runs in order, reports its section, is checked in preflight
and honours the budget; the runner names no phase."""
from __future__ import annotations

import ast
import json

from conftest import REPO_ROOT

from llm_merging.core.errors import ConfigError
from llm_merging.pipeline import Phase, RunConfig, RunContext, Runner, default_phases
from llm_merging.pipeline.phases import MergePhase, SavePhase


class Spy(Phase):
    """Records what it saw of the run when its turn came."""

    name = "spy"
    needs_weights = False

    def __init__(self, log: list, name: str = "spy", fail_check: bool = False, spend: bool = False,
                 checks_budget: bool = True) -> None:
        self.log, self.name, self.fail_check, self.spend, self.checks_budget = log, name, fail_check, spend, checks_budget

    def check(self, ctx: RunContext) -> None:
        self.log.append(("check", self.name, ctx.method.base_model is None))
        if self.fail_check:
            raise ConfigError(f"--{self.name}: refused in preflight")

    def run(self, ctx: RunContext) -> dict:
        merged = ctx.method.base_model is not None
        self.log.append(("run", self.name, merged, "saved" in ctx.report))
        if self.spend:
            ctx.budget.seconds = -1.0  # the budget is spent from here on
        return {"merged_before_me": merged}

    def finish(self, ctx: RunContext) -> None:
        self.log.append(("finish", self.name))


def config(tmp_path, **kw) -> RunConfig:
    return RunConfig(method="task_arithmetic", tiny=True, output_folder=str(tmp_path), evaluate=False,
                     save="none", progress=False, **kw)


def with_spies(*spies: Phase) -> list[Phase]:
    """The default phases with ``spies`` inserted: the first before the merge, the others after the save."""
    phases = default_phases()
    merge = next(i for i, p in enumerate(phases) if isinstance(p, MergePhase))
    phases.insert(merge, spies[0])
    save = next(i for i, p in enumerate(phases) if isinstance(p, SavePhase))
    phases[save + 1:save + 1] = list(spies[1:])
    return phases


def test_a_registered_phase_runs_in_order_and_reports_its_section(tmp_path):
    log: list = []
    runner = Runner(config(tmp_path), phases=with_spies(Spy(log, "before"), Spy(log, "after")))
    assert runner.run() == 0, runner.report.get("error")
    assert log == [("check", "before", True), ("check", "after", True),  # preflight: no weights loaded
                   ("run", "before", False, False), ("run", "after", True, False),
                   ("finish", "before"), ("finish", "after")]
    report = json.loads((tmp_path / "task_arithmetic" / "report.json").read_text())
    assert report["before"] == {"merged_before_me": False} and report["after"] == {"merged_before_me": True}
    assert list(report["phases_seconds"]) == ["preflight", "before", "load", "merge", "save", "after"]


def test_a_phase_that_fails_its_check_stops_the_run_before_any_weight(tmp_path):
    log: list = []
    runner = Runner(config(tmp_path), phases=with_spies(Spy(log, "before"), Spy(log, "after", fail_check=True)))
    assert runner.run() == 2
    assert runner.report["error"] == "--after: refused in preflight"
    assert not any(entry[0] == "run" for entry in log)
    assert runner.method.base_model is None
    assert not (tmp_path / "task_arithmetic" / "report.json").exists()  # nothing written before preflight passed


def test_a_phase_honours_the_budget(tmp_path):
    log: list = []
    spent = Spy(log, "spend", spend=True)
    runner = Runner(config(tmp_path), phases=with_spies(Spy(log, "before"), spent, Spy(log, "late"),
                                                        Spy(log, "always", checks_budget=False)))
    assert runner.run() == 3
    assert runner.report["error"].endswith("ran out before the late phase")
    assert runner.report["status"] == "partial" and runner.report["spend"] == {"merged_before_me": True}
    ran = [entry[1] for entry in log if entry[0] == "run"]
    assert ran == ["before", "spend"]  # neither the phase past the budget nor any after it ran
    assert ("finish", "late") in log  # every phase is told the run ended


def test_a_disabled_phase_is_neither_checked_nor_run(tmp_path):
    log: list = []

    class Off(Spy):
        def enabled(self, config: RunConfig) -> bool:
            return config.evaluate

    runner = Runner(config(tmp_path), phases=with_spies(Spy(log, "before"), Off(log, "off")))
    assert runner.run() == 0
    assert [entry[1] for entry in log] == ["before", "before", "before"]
    assert "off" not in runner.report


def test_the_runner_names_no_phase():
    tree = ast.parse(open(f"{REPO_ROOT}/llm_merging/pipeline/runner.py", encoding="utf-8").read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    phase_classes = {name for name in dir(__import__("llm_merging.pipeline.phases", fromlist=["x"]))
                     if name.endswith("Phase") and name != "Phase"}
    assert phase_classes and not imported & phase_classes
    text = open(f"{REPO_ROOT}/llm_merging/pipeline/runner.py", encoding="utf-8").read()
    for name in ("search", "merge", "save", "evaluate", "analyze", "baselines"):
        assert f'"{name}"' not in text and f"'{name}'" not in text, name


def test_the_data_aware_list_names_every_method_that_reads_calibration_data():
    from llm_merging.core.choices import DATA_AWARE_METHODS
    from llm_merging.merging import BUILTIN_METHODS, get_method_class

    assert set(DATA_AWARE_METHODS) == {n for n in BUILTIN_METHODS if get_method_class(n).needs_calibration}
