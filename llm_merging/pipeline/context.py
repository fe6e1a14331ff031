"""`RunContext`: what the phases of one run read and write (configuration, method, budget, processes,
output folder, datasets, report), and `Phase`, the protocol every phase follows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llm_merging.core.budget import Budget
from llm_merging.core.errors import BudgetExceeded
from llm_merging.core.io import jsonable
from llm_merging.core.outputs import OutputFolders
from llm_merging.core.processes import SINGLE, Processes
from llm_merging.merging.chain import MergeChain
from llm_merging.merging.Merges import Merges
from llm_merging.merging.settings import settings_json
from llm_merging.pipeline.config import RunConfig


@dataclass
class RunContext:
    """The state of one run, shared by its phases."""

    config: RunConfig
    budget: Budget
    method: Merges | None = None
    processes: Processes = field(default_factory=lambda: SINGLE)  # several under ``accelerate launch``
    out_dir: Path = Path("output")  # OUTPUT_FOLDER/METHOD
    datasets: list[str] = field(default_factory=list)  # evaluation files
    examples: list[list[dict]] = field(default_factory=list)  # rows of each, loaded once in preflight
    report: dict[str, Any] = field(default_factory=dict)  # becomes report.json
    phases: list["Phase"] = field(default_factory=list)  # the enabled phases of this run, in order
    preflight_ok: bool = False  # every check passed: outputs may be written
    outputs: OutputFolders = field(default_factory=OutputFolders)  # the output folders this run holds
    chain: MergeChain | None = None  # a chained recipe's merges (--recipe with several documents)

    def check_budget(self, what: str) -> None:
        """BudgetExceeded when the wall-clock budget is spent (on any process)."""
        if self.processes.max(int(self.budget.expired())):
            raise BudgetExceeded(f"time budget of {self.config.time_budget:g} s ran out before the {what} phase")

    def set_method(self, method: Merges) -> None:
        """Make ``method`` the run's method (e.g. the search's best): output folder and report follow it."""
        self.method = method
        self.report["method"] = method.name
        self.out_dir = self.method_folder(method)
        if self.processes.is_main:  # process 0 writes every output (a searched method's folder is held already)
            self.claim_output_folder()
        self.report["hyperparameters"] = jsonable(settings_json(method.hparams))

    def method_folder(self, method: Merges) -> Path:
        """The output folder ``OUTPUT/METHOD/`` of ``method``."""
        return Path(self.config.output_folder) / str(method.get_name())

    def hold_output_folder(self, folder: Path | None = None) -> None:
        """Take ``folder`` (default ``out_dir``) for this run (process 0): created when missing, writable,
        locked against other runs (OutputError naming the holder). Nothing else is written or removed: a
        run refused later leaves nothing (`llm_merging.core.outputs`)."""
        cfg = self.config
        self.outputs.resuming = bool(cfg.resume or (cfg.search is not None and cfg.search.resume))
        self.outputs.lock(self.out_dir if folder is None else Path(folder), command=cfg.argv)

    def claim_output_folder(self) -> None:
        """Make ``out_dir`` this run's (process 0): held (`hold_output_folder`), stale temporaries of dead
        runs removed, its files recorded for the manifest (`llm_merging.core.outputs`)."""
        self.hold_output_folder()
        self.outputs.claim(self.out_dir, command=self.config.argv)

    def needs_weights_after(self, phase: "Phase") -> bool:
        """Whether a phase after ``phase`` reads the merged model in memory."""
        later = self.phases[self.phases.index(phase) + 1:] if phase in self.phases else []
        return any(p.needs_weights for p in later)

    def add_seconds(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to ``name`` in report.json ``phases_seconds``."""
        self.budget.phases[name] = self.budget.phases.get(name, 0.0) + seconds


class Phase:
    """One step of a run. The runner calls ``check`` for every enabled phase in preflight (no weights
    loaded), then ``run`` in order, then ``finish`` once the run ended and report.json is written.

    Adding a phase: one module in ``llm_merging/pipeline/phases/`` and one line in `default_phases`.
    """

    #: its name: its ``phases_seconds`` entry and (unless ``section`` says otherwise) its report.json key
    name: ClassVar[str] = ""
    #: the key of its report.json section when not ``name``
    section: ClassVar[str | None] = None
    #: the runner checks the budget before it (False: it runs even when the budget is spent, as the save
    #: of a finished merge does)
    checks_budget: ClassVar[bool] = True
    #: with several processes: "all" run it together, "main" only process 0 (which writes the outputs)
    processes: ClassVar[str] = "all"
    #: reads the merged model in memory (phases before it must not write it to disk instead)
    needs_weights: ClassVar[bool] = True
    #: the runner times it under ``name`` (False: the phase records its own times in ``ctx.budget``)
    timed: ClassVar[bool] = True

    def enabled(self, config: RunConfig) -> bool:
        """Whether this run needs the phase."""
        return True

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        """The outputs the phase writes when it completes, relative to ``ctx.out_dir`` (folders end in
        ``/``): report.json ``outputs.not_produced`` names those a failed or stopped run did not write."""
        return []

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        """Preflight: the disk the phase's outputs and temporary spills need, as ``(folder, bytes, what)``;
        the runner refuses the run (one line) where the free space is short."""
        return []

    def check(self, ctx: RunContext) -> None:
        """Preflight: validate what the phase will need (files, options, tasks); never load weights."""

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        """Do the work; the returned section (if any) goes into report.json under ``name``."""
        return None

    def finish(self, ctx: RunContext) -> None:
        """After the run, whatever its status (report.json written): clean up, write extra files. Must not raise."""
