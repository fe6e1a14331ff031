"""The merge phase: load the base and the experts, merge, and record what the merge reports."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from llm_merging.core import processes as procs
from llm_merging.core.errors import LLMMergingError
from llm_merging.merging.calibration import overlapping_files
from llm_merging.merging.Merges import Merges
from llm_merging.model.save import AdapterWriter, NotStreamable, StreamingSave
from llm_merging.pipeline.context import Phase, RunContext

logger = logging.getLogger(__name__)


class MergePhase(Phase):
    name = "merge"
    timed = False  # it records "load" and "merge" (the math) apart

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        method = ctx.method
        note_calibration(ctx)
        if ctx.config.save == "adapter":  # low-rank factors collected while merging, before θ is overwritten
            method.delta_sink = AdapterWriter(rank=method.adapter_rank)  # bound to the model by the merge
        if self.streams_to_disk(ctx):
            method.save_while_merging = lambda model: save_while_merging(ctx, model)
        t0 = time.time()
        try:
            ctx.processes.together(lambda: merge(ctx))
            if ctx.processes.world > 1:  # every process merged: the same weights everywhere, else rank 0's
                ctx.report["processes"]["merge"] = procs.same_weights(ctx.processes, method.base_model)
        finally:  # loading apart from the merge math, also when the merge failed
            load = method.load_seconds
            ctx.timed("load", load)
            ctx.timed("merge", max(time.time() - t0 - load, 0.0))
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


def save_while_merging(ctx: RunContext, model: torch.nn.Module) -> StreamingSave | None:
    """A `StreamingSave` the engine writes the merged values into as it computes them (the merged model
    is never held in memory); None where the model must be saved whole."""
    recipe = ctx.method.recipe
    dtype = getattr(torch, recipe.out_dtype) if recipe is not None and recipe.out_dtype else None
    try:
        return StreamingSave(model, ctx.out_dir / "merged_model", dtype=dtype)
    except NotStreamable as exc:
        logger.info("the merged model is written after the merge (%s)", exc)
        return None


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
