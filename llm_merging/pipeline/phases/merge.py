"""The merge phase: load the base and the experts, merge, and record what the merge reports."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from llm_merging.core import processes as procs
from llm_merging.core.errors import BudgetExceeded, ConfigError, LLMMergingError
from llm_merging.core.io import jsonable
from llm_merging.core.resources import versions
from llm_merging.merging.calibration import overlapping_files
from llm_merging.merging.Merges import Merges
from llm_merging.merging.settings import settings_json
from llm_merging.model.save import (AdapterWriter, NotStreamable, StreamingSave, find_resumable,
                                    fingerprint_differences, journal_of, read_journal)
from llm_merging.pipeline.context import Phase, RunContext

logger = logging.getLogger(__name__)


class MergePhase(Phase):
    name = "merge"
    timed = False  # it records "load" and "merge" (the math) apart

    def __init__(self) -> None:
        self.fingerprint: dict[str, Any] | None = None  # the inputs and options of a merge written while merging
        self.resume: Path | None = None  # the interrupted merge --resume continues
        self.writer: StreamingSave | None = None

    def check(self, ctx: RunContext) -> None:
        """A merge written while merging is journalled with the run's fingerprint; ``--resume`` finds the
        merge a stopped run left in the output folder (the runner holds the folder's lock by now, so another
        host's merge is taken too) and refuses (one line) when its inputs or options differ."""
        cfg = ctx.config
        self.fingerprint = self.resume = self.writer = None
        if not self.streams_to_disk(ctx):
            if cfg.resume and cfg.search is None:
                raise ConfigError(f"--resume continues a merge written while merging (--save full, no evaluation "
                                  f"or --baselines, one process, an engine method without calibration data); "
                                  f"method '{ctx.method.name}' is merged in memory, so there is nothing to resume")
            return
        self.fingerprint = merge_fingerprint(ctx)
        if not cfg.resume:
            return
        found = find_resumable(ctx.out_dir, "merged_model", any_host=ctx.outputs.holds(ctx.out_dir))
        live = [r for r in found if r["live"]]
        if live:  # not ours to continue: named (the sweep leaves them alone and lists them too)
            logger.warning("--resume: %s", "; ".join(
                f"skipped {r['path']} (pid {r['pid']} on {r['host']}, {r['done']} tensors): its process may still "
                "run" for r in live))
        found = [r for r in found if not r["live"]]
        if not found:
            logger.warning("--resume: no interrupted merge in %s%s; merging from the start", ctx.out_dir,
                           " that this run may continue" if live else "")
            return
        same = [r for r in found if not fingerprint_differences(r["header"].get("fingerprint") or {}, self.fingerprint)]
        if not same:
            differ = fingerprint_differences(found[0]["header"].get("fingerprint") or {}, self.fingerprint)
            raise ConfigError(f"--resume: the interrupted merge in {ctx.out_dir} was made with other inputs or "
                              f"options ({', '.join(differ[:4])}); run without --resume to start again")
        last = same[0]
        self.resume = last["path"]
        ctx.outputs.keep |= {last["path"], last["journal"]}  # not a stale temporary: this run continues it
        ctx.report["resumed"] = {"from": str(last["path"]), "tensors_done": last["done"], "pid": last["pid"],
                                 "host": last["host"]}

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        """The method's temporary spills (e.g. Fisher's); less what a resumed merge has written already."""
        needs = [(Path(folder), int(n), what) for folder, n, what in ctx.method.scratch_space()]
        if self.resume is not None:
            written = sum(f.stat().st_blocks * 512 for f in self.resume.iterdir() if f.is_file())
            needs.append((ctx.out_dir, -written, "written by the interrupted merge"))
        return needs

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        method = ctx.method
        note_calibration(ctx)
        if ctx.config.save == "adapter":  # low-rank factors collected while merging, before θ is overwritten
            method.delta_sink = adapter_writer(method)  # bound to the model and experts by the merge
        if self.streams_to_disk(ctx):
            def stream(model: torch.nn.Module) -> StreamingSave | None:
                self.writer = save_while_merging(ctx, model, self.fingerprint, self.resume)
                return self.writer

            method.save_while_merging = stream
        t0 = time.time()
        try:
            ctx.processes.together(lambda: merge(ctx))
            if ctx.processes.world > 1:  # every process merged: the same weights everywhere, else rank 0's
                ctx.report["processes"]["merge"] = procs.same_weights(ctx.processes, method.base_model)
        except BudgetExceeded as exc:
            kept = self.writer.kept if self.writer is not None else None
            if kept is None:
                raise
            text = str(exc).removesuffix("; nothing was saved")
            raise BudgetExceeded(f"{text}; the {len(read_journal(journal_of(kept))[1])} tensors merged so far are "
                                 f"kept in {kept}: the same command with a larger --time-budget and --resume "
                                 "continues the merge") from None
        finally:  # loading apart from the merge math, also when the merge failed
            load = method.load_seconds
            ctx.add_seconds("load", load)
            ctx.add_seconds("merge", max(time.time() - t0 - load, 0.0))
        return None

    def streams_to_disk(self, ctx: RunContext) -> bool:
        """Whether the merge may write the saved model while it runs: ``--save full`` of a plain engine
        method in one process, and no later phase reads the merged weights in memory."""
        method = ctx.method
        return (ctx.config.save == "full" and ctx.processes.world == 1 and ctx.config.search is None
                and not ctx.needs_weights_after(self) and type(method).merge is Merges.merge
                and not method.needs_calibration)

    def finish(self, ctx: RunContext) -> None:
        writer = ctx.method.stream_writer if ctx.method is not None else None
        if writer is not None:
            writer.abort()  # a model written while merging but never finished: removed (no-op once saved)
        kept = self.writer.kept if self.writer is not None else None
        if kept is not None:  # interrupted or stopped by the budget: the tensors written stay for --resume
            budget = self.writer.kept_on == "budget"
            ctx.outputs.keep_for_resume(
                kept, journal_of(kept), tensors_done=len(read_journal(journal_of(kept))[1]),
                tensors_total=len(self.writer.source),
                stopped_by="budget" if budget else ctx.report.get("interrupted") or "SIGINT",
                continue_with="the same command with a larger --time-budget and --resume" if budget
                else "the same command with --resume")


def merge(ctx: RunContext) -> None:
    method = ctx.method
    method.merge()
    if method.base_model is None:
        raise LLMMergingError(f"method '{ctx.config.method}': merge() left no model in self.base_model")
    ctx.report["merge_stats"] = method.merge_stats or {}
    if method.needs_calibration:
        ctx.report.setdefault("calibration", {}).update(method.calibration_report())
    if method.vocabulary_report:  # output tokenizer, or vocabulary mismatches
        ctx.report["vocabulary"] = method.vocabulary_report
    recipe = method.recipe
    if recipe is not None and recipe.out_dtype:  # mergekit's out_dtype: the saved (and evaluated) dtype
        if method.stream_writer is None:  # else the writer casts as it writes
            method.base_model.to(getattr(torch, recipe.out_dtype))
        ctx.report["out_dtype"] = recipe.out_dtype


def adapter_writer(method: Merges) -> AdapterWriter:
    """``--save adapter``'s writer, from the run options ``--adapter-rank`` / ``--adapter-energy`` /
    ``--adapter-max-rank`` (or their ``--set`` aliases) on the method."""
    return AdapterWriter(rank=method.adapter_rank, energy=method.adapter_energy, max_rank=method.adapter_max_rank)


def save_while_merging(ctx: RunContext, model: torch.nn.Module, fingerprint: dict[str, Any] | None = None,
                       resume: Path | None = None) -> StreamingSave | None:
    """A `StreamingSave` the engine writes the merged values into as it computes them (the merged model
    is never held in memory), journalled with ``fingerprint`` and continuing the interrupted merge
    ``resume``; None where the model must be saved whole."""
    recipe = ctx.method.recipe
    dtype = getattr(torch, recipe.out_dtype) if recipe is not None and recipe.out_dtype else None
    try:
        return StreamingSave(model, ctx.out_dir / "merged_model", dtype=dtype, fingerprint=fingerprint,
                             resume=resume)
    except NotStreamable as exc:
        if resume is not None:
            raise ConfigError(f"--resume: the model cannot be written while merging any more ({exc}); run "
                              "without --resume") from None
        logger.info("the merged model is written after the merge (%s)", exc)
        return None


def merge_fingerprint(ctx: RunContext) -> dict[str, Any]:
    """What a merge written while merging depends on, as JSON values: the models (references, resolved
    revisions, paths, and each file's size and modification time), the method, its hyperparameters, the
    dtypes, the device, the seed, the recipe's text, and the library versions. A resumed merge must match."""
    method = ctx.method
    models = ctx.report.get("models") or {}
    entries = {"base": dict(models.get("base") or {})}
    for i, expert in enumerate(models.get("experts") or []):
        entries[f"expert {i}"] = dict(expert)
    for entry in entries.values():
        entry["files"] = _files(entry.get("path"))
    recipe = method.recipe
    text = None
    if ctx.config.recipe:
        try:
            text = hashlib.sha256(Path(ctx.config.recipe).read_bytes()).hexdigest()
        except OSError:
            text = None
    lib = versions()
    fp = {"method": f"{method.name} ({type(method).__module__}.{type(method).__qualname__})",
          "models": entries, "hyperparameters": jsonable(settings_json(method.hparams)),
          "dtype": str(method.torch_dtype()), "out_dtype": recipe.out_dtype if recipe is not None else None,
          "device": str(method.torch_device()), "seed": method.seed, "recipe": text,
          "versions": {k: lib.get(k) for k in ("llm_merging", "torch", "transformers", "safetensors")}}
    return json.loads(json.dumps(fp, sort_keys=True, default=str))


def _files(path: str | None) -> dict[str, list[int]]:
    """``{file name: [bytes, mtime_ns]}`` of a model directory's files."""
    out: dict[str, list[int]] = {}
    if not path or not Path(path).is_dir():
        return out
    for f in sorted(Path(path).iterdir()):
        try:
            if f.is_file():
                st = f.stat()
                out[f.name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            continue
    return out


def note_calibration(ctx: RunContext) -> None:
    """report.json ``calibration``: the files, and whether they are also evaluated or searched (then the
    scores are optimistic)."""
    method = ctx.method
    if not method.needs_calibration or method.calibration is None:  # data-aware methods load it in preflight
        return
    others = list(ctx.datasets) if ctx.config.evaluate else []
    others += list((ctx.report.get("search") or {}).get("search_data") or [])
    overlap = overlapping_files(method.calibration, others)
    ctx.report["calibration"] = {"files": list(method.calibration.files), "optimistic": bool(overlap),
                                 **({"also_evaluated_or_searched": overlap} if overlap else {})}
    if overlap and ctx.processes.is_main:
        logger.warning("calibration data %s is also evaluation or search data: the scores are optimistic",
                       ", ".join(overlap))
