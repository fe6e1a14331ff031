"""The runner: one run under one wall-clock budget. Preflight (the configuration validated, the method built
and its models resolved, every phase checked; no weights loaded), then the phases it is given in order,
then report.json.

Exit statuses: 0 success, 2 a user error (one line on stderr), 3 the budget ran out (finished work is
kept and the report is marked partial), 130 interrupted (Ctrl-C, same), 143 stopped by SIGTERM (same), 1 an
internal error.

Run-level concerns live here, whatever the phases: the output folder is locked against a second run before
the phases' checks and claimed once they passed (stale temporaries of dead runs removed, its files
recorded) after the disk the phases declare is checked against the free space, SIGINT/SIGTERM stop the run at its next safe point, a
full disk is one line, and report.json ``outputs`` says which files this run wrote
(`llm_merging.core.outputs`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from llm_merging.core import processes as procs
from llm_merging.core.budget import Budget
from llm_merging.core.errors import BudgetExceeded, ConfigError, LLMMergingError, signal_name
from llm_merging.core.io import atomic_write_json, jsonable
from llm_merging.core.outputs import check_space, disk_full, disk_full_message
from llm_merging.core.processes import Processes
from llm_merging.core.resources import peak_memory, versions
from llm_merging.core.signals import graceful_stop, interrupted_by
from llm_merging.merging.Merges import Merges
from llm_merging.merging.chain import is_chain, load_chain
from llm_merging.merging.recipe import load_recipe
from llm_merging.merging.settings import settings_json
from llm_merging.pipeline.build import configured_method
from llm_merging.pipeline.config import RunConfig
from llm_merging.pipeline.context import Phase, RunContext
from llm_merging.pipeline.phases import default_phases

logger = logging.getLogger(__name__)


def build_method(config: RunConfig, ctx: RunContext) -> Merges:
    """The configured method of a run: the recipe's (``--recipe``) or the registered one, with the run's
    models, device, dtype, seed, calibration data and ``--set`` values."""
    recipe = None
    if config.recipe:
        if is_chain(config.recipe):  # several merges (mergekit-multi): the run's method is the final one's
            ctx.chain = load_chain(config.recipe)
            recipe = ctx.chain.final.recipe
        else:
            recipe = load_recipe(config.recipe)
        if config.method and config.method != recipe.method:
            raise ConfigError(f"--recipe {config.recipe} merges with '{recipe.method}', but -m asks for '{config.method}'")
        config.method = recipe.method
        ctx.report["method"] = config.method
        ctx.report["recipe"] = {"path": config.recipe, "merge_method": recipe.document.get("merge_method"),
                                **({"merges": len(ctx.chain.steps)} if ctx.chain is not None else {})}
    if config.save_intermediates and ctx.chain is None:
        raise ConfigError("--save-intermediates saves the merges a chained recipe makes before its final one; "
                          "give --recipe a file of several merges (YAML documents with a name each)")
    return configured_method(config, ctx, recipe)


class Runner:
    """One run: ``run()`` returns the exit status and leaves ``report``.

    ``phases``: the phases to walk, in order (default: `default_phases`); each runs when it is enabled
    for the configuration."""

    def __init__(self, cfg: RunConfig, budget: Budget | None = None, phases: Sequence[Phase] | None = None) -> None:
        self.cfg = cfg
        # The CLI passes a budget counted from process start; library callers get one that starts now.
        budget = budget or Budget(cfg.time_budget, start=time.time())
        self.context = RunContext(config=cfg, budget=budget, out_dir=Path(cfg.output_folder) / cfg.method)
        self.context.report.update({
            "method": cfg.method, "status": "running", "partial": False, "exit_status": None,
            "command": cfg.argv, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self.all_phases = list(default_phases() if phases is None else phases)
        self.context.phases = [p for p in self.all_phases if p.enabled(cfg)]

    # the run's state lives in its context; these read it
    @property
    def report(self) -> dict[str, Any]:
        return self.context.report

    @property
    def method(self) -> Merges | None:
        return self.context.method

    @property
    def budget(self) -> Budget:
        return self.context.budget

    @property
    def procs(self) -> Processes:
        return self.context.processes

    @procs.setter
    def procs(self, value: Processes) -> None:
        self.context.processes = value

    @property
    def preflight_ok(self) -> bool:
        return self.context.preflight_ok

    # -------------------------------------------------------------- preflight
    def preflight(self) -> None:
        """Everything checked before any weight is loaded; ConfigError (one line) on the first problem."""
        ctx, cfg = self.context, self.cfg
        cfg.validate(processes=ctx.processes.world)
        if ctx.processes.world > 1:
            ctx.report["processes"] = {"backend": ctx.processes.backend}
        method = ctx.method = build_method(cfg, ctx)
        # a chained recipe's final merge reads merges not made yet: the chain phase checks it once they are
        ctx.report["models"] = method.preflight() if ctx.chain is None else {}
        ctx.out_dir = ctx.method_folder(method)
        # Process 0 writes every output. It takes the folder first (a second run is refused), so that the
        # checks (--resume's search for an interrupted merge) see a folder no live run of ours uses. Until
        # every check passed, the lock file (and the folder, when missing) is all that is created; a refused
        # run removes both as it ends.
        if ctx.processes.is_main:
            ctx.hold_output_folder()
        for phase in ctx.phases:
            phase.check(ctx)
        if ctx.processes.is_main:
            needs = [need for phase in ctx.phases for need in phase.disk_space(ctx)]
            needs += ctx.outputs.freeable(ctx.out_dir)  # what removing stale temporaries will free
            ctx.report["disk_space"] = check_space(needs)  # refused before any weight when it does not fit
            ctx.claim_output_folder()  # stale temporaries removed (never one --resume continues), files recorded
        ctx.preflight_ok = True
        ctx.report["hyperparameters"] = jsonable(settings_json(method.hparams))
        ctx.report["options"] = {"mc_scoring": method.mc_scoring, "adapter_rank": method.adapter_rank,
                                 "adapter_energy": method.adapter_energy, "adapter_max_rank": method.adapter_max_rank}
        ctx.report["seed"] = method.seed
        ctx.report["num_processes"] = ctx.processes.world
        ctx.report["architecture"] = method.architecture
        ctx.report["device"] = str(method.torch_device())
        ctx.report["dtype"] = str(method.torch_dtype()).replace("torch.", "")

    def _preflight_everywhere(self) -> None:
        ctx = self.context
        p = ctx.processes
        if self.cfg.tiny and p.world > 1:  # process 0 builds the tiny models, then the others
            p.on_main(self.preflight)
            p.together(lambda: None if p.is_main else self.preflight())
        else:
            p.together(self.preflight)
        if p.world > 1:
            ctx.report["processes"]["devices"] = p.exchange(str(ctx.method.torch_device()))

    # -------------------------------------------------------------- driver
    def run(self) -> int:
        ctx = self.context
        status = 0
        try:
            with graceful_stop(ctx.budget):  # SIGINT/SIGTERM: stop at the next safe point
                status = self._run()
        finally:
            ctx.outputs.release()  # this run's temporaries removed (not one kept to resume), the lock dropped
        return status

    def _run(self) -> int:
        ctx = self.context
        status = 0
        try:
            ctx.processes = procs.start(timeout_s=self.cfg.time_budget + 600)  # SINGLE unless launched as several
            with ctx.budget.phase("preflight"):
                self._preflight_everywhere()
            for phase in ctx.phases:
                self._run_phase(phase)
            ctx.report["status"] = "ok"
        except BudgetExceeded as exc:
            signum = interrupted_by(ctx.budget)  # a signal ends the budget early: the loops stop as for it
            status = self._interrupted(signum) if signum else self._fail(exc, "partial", exc.exit_code)
        except KeyboardInterrupt as exc:
            status = self._interrupted(getattr(exc, "signum", None) or interrupted_by(ctx.budget))
        except LLMMergingError as exc:
            status = self._fail(exc, "error", exc.exit_code)
        except Exception as exc:  # an internal bug: still one line, traceback with --debug
            if disk_full(exc):  # ENOSPC: the atomic writers removed what they had half-written
                logger.debug("disk full", exc_info=True)
                status = self._fail(disk_full_message(exc, ctx.out_dir), "error", 2)
                ctx.report["disk_full"] = True
            else:
                logger.debug("internal error", exc_info=True)
                status = self._fail(f"internal error: {type(exc).__name__}: {exc}", "error", 1)
                ctx.report["internal_error"] = True
                if logging.getLogger().isEnabledFor(logging.DEBUG):
                    raise
        finally:
            ctx.report["exit_status"] = status
            self._write_report()
            for phase in ctx.phases:
                phase.finish(ctx)
            self._write_report(final=True)  # the manifest again: files the phases wrote as they finished
        return status

    def _interrupted(self, signum: int | None) -> int:
        """SIGINT (Ctrl-C, or a KeyboardInterrupt) → 130, SIGTERM → 143; the report marked interrupted."""
        name = signal_name(signum) if signum else "SIGINT"
        self.report["interrupted"] = name
        what = "Ctrl-C" if name == "SIGINT" else name
        return self._fail(f"interrupted ({what}); finished work was kept", "partial", 128 + (signum or 2))

    def _run_phase(self, phase: Phase) -> None:
        ctx = self.context
        if phase.checks_budget:
            ctx.check_budget(phase.name)
        run = (lambda: ctx.processes.on_main(lambda: phase.run(ctx))) if phase.processes == "main" else (
            lambda: phase.run(ctx))
        if phase.timed:
            with ctx.budget.phase(phase.name):
                section = run()
        else:
            section = run()
        if section is not None:
            ctx.report[phase.section or phase.name] = section

    def _fail(self, exc: Any, status: str, code: int) -> int:
        self.report["status"] = status
        self.report["partial"] = status == "partial"
        self.report["error"] = str(exc)
        return code

    def _write_report(self, final: bool = False) -> None:
        """report.json, with ``outputs``: the manifest of what this run wrote. ``final``: after the phases'
        ``finish``, rewritten only when they wrote more files."""
        ctx = self.context
        if not final:
            self.report["phases_seconds"] = {k: round(v, 3) for k, v in ctx.budget.phases.items()}
            self.report["budget"] = {
                "seconds": self.cfg.time_budget, "elapsed": round(ctx.budget.elapsed(), 3),
                "remaining": round(ctx.budget.left(), 3),
            }
            self.report.update(peak_memory())
            self.report["versions"] = versions()
            self.report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not ctx.preflight_ok or not ctx.processes.is_main:
            return
        try:
            before = self.report.get("outputs")
            try:
                self.report["outputs"] = self._manifest()
            except Exception as exc:  # the manifest must never cost the report
                logger.error("cannot list this run's outputs in %s: %s: %s", ctx.out_dir, type(exc).__name__, exc)
                self.report["outputs"] = {"error": f"{type(exc).__name__}: {exc}"}
            now = self.report["outputs"]
            if final and before is not None and before.get("written") == now.get("written") and \
                    before.get("resumable") == now.get("resumable"):
                self.report["outputs"] = before
                return
            if ctx.out_dir.is_dir():
                atomic_write_json(ctx.out_dir / "report.json", jsonable(self.report))
        except OSError as exc:
            logger.error("cannot write report.json in %s: %s", ctx.out_dir, exc)

    def _manifest(self) -> dict[str, Any]:
        ctx = self.context
        expected = [p for phase in ctx.phases for p in phase.expected_outputs(ctx)]
        out = ctx.outputs.manifest(ctx.out_dir, expected)
        out["folder"] = str(ctx.out_dir)
        out["lock"] = "unsupported" if ctx.outputs.unlocked else "held"
        if ctx.outputs.unlocked:
            out["unlocked"] = list(ctx.outputs.unlocked)
        out["removed_temporaries"] = list(ctx.outputs.removed)
        if ctx.outputs.skipped:
            out["skipped_temporaries"] = list(ctx.outputs.skipped)
        if ctx.outputs.taken_over:
            out["locks_taken_over"] = list(ctx.outputs.taken_over)
        kept = [r for r in ctx.outputs.resumable if Path(r["path"]).exists()]
        if kept:  # a merge this run stopped, left for --resume
            out["resumable"] = kept
        return out
