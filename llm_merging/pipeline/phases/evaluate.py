"""The evaluate phase: the kit's evaluation files (accuracy, ROUGE), then ``--lm-eval`` tasks, on the
merged model in memory; one ``scores.jsonl`` line for both."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llm_merging import lm_eval_tasks
from llm_merging.core.errors import BudgetExceeded, DataError
from llm_merging.core.io import jsonable
from llm_merging.data import eval_types_for, load_examples
from llm_merging.evaluation import EvaluationResult, evaluate_model, unique_names, write_scores_line
from llm_merging.model import tiny
from llm_merging.pipeline.config import DEFAULT_DATASETS, RunConfig
from llm_merging.pipeline.context import Phase, RunContext


class EvaluatePhase(Phase):
    name = "evaluate"
    section = "evaluation"
    timed = False  # it records "evaluate" and "evaluate:<file>" itself

    def __init__(self) -> None:
        self.lm_eval = None  # the prepared --lm-eval tasks

    def enabled(self, config: RunConfig) -> bool:
        return config.evaluate

    def check(self, ctx: RunContext) -> None:
        """Every evaluation file read and checked whole; lm-eval installed and every task loadable."""
        cfg = ctx.config
        files = cfg.dataset_filepaths or (tiny.sample_data_files() if cfg.tiny else DEFAULT_DATASETS)
        if cfg.lm_eval is not None and not cfg.dataset_filepaths:  # --lm-eval alone: its tasks instead of kit files
            files = []
        types = eval_types_for(cfg.eval_types or None, len(files))
        sizes, ctx.examples = {}, []
        for i, path in enumerate(files):
            if not path.startswith("hf:") and not os.path.isfile(path):
                hint = " (pass --dataset_filepaths, or --no-eval)" if not cfg.dataset_filepaths else ""
                raise DataError(f"dataset file '{path}' does not exist{hint}")
            ctx.examples.append(load_examples(path, eval_type=types[i]))
            sizes[path] = len(ctx.examples[-1])
        ctx.datasets = list(files)
        ctx.report["dataset_sizes"] = sizes
        if cfg.lm_eval is not None:
            self.lm_eval = lm_eval_tasks.prepare(cfg.lm_eval, progress=cfg.progress)

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        out = []
        for name, rows in zip(unique_names(ctx.datasets), ctx.examples):
            out.append(f"predictions/{name}.jsonl")
            if rows and all("id" in r for r in rows):
                out.append(f"{name}_submission.csv")
        if self.lm_eval is not None:
            out.append("lm_eval/results.json")
        return out + ["scores.jsonl"]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        rows = sum(len(r) for r in ctx.examples)
        return [(ctx.out_dir, (1 << 20) + 4096 * rows + ((16 << 20) if self.lm_eval is not None else 0),
                 "predictions and scores")]

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        with ctx.budget.phase("evaluate"):
            complete = ctx.processes.together(lambda: self.evaluate(ctx))
        if not complete:
            raise BudgetExceeded(f"time budget of {ctx.config.time_budget:g} s ran out during evaluation; "
                                 "finished predictions were saved")
        return ctx.report["evaluation"]

    def evaluate(self, ctx: RunContext) -> bool:
        """Every dataset, then the lm-eval tasks; False when the budget stopped it."""
        cfg, procs = ctx.config, ctx.processes
        if ctx.datasets or self.lm_eval is None:
            result = evaluate_model(
                ctx.method, ctx.datasets, cfg.output_folder, eval_types=cfg.eval_types,
                batch_size=cfg.batch_size, max_examples=cfg.max_examples, budget=ctx.budget, progress=cfg.progress,
                examples=ctx.examples, write_scores=self.lm_eval is None, processes=procs,
                shares=ctx.report["processes"].setdefault("shares", {}) if procs.world > 1 else None,
            )
        else:
            result = EvaluationResult(method=str(ctx.method.get_name()), output_dir=str(ctx.out_dir))
        if self.lm_eval is not None:  # after the kit files, in memory; one scores.jsonl line for both
            datasets: list = []
            try:  # none run when the kit files spent the budget
                datasets, ctx.report["lm_eval"] = lm_eval_tasks.evaluate(
                    ctx.method, self.lm_eval, result.output_dir, batch_size=cfg.batch_size, budget=ctx.budget,
                    taken={d.name for d in result.datasets})
            finally:  # the kit files' scores are kept whatever happens to the lm-eval tasks
                result.datasets.extend(datasets)
                write_scores_line(result)
                ctx.report["evaluation"] = jsonable(result)
            if ctx.report["lm_eval"].get("error"):
                raise DataError(ctx.report["lm_eval"]["error"])
        ctx.report["evaluation"] = jsonable(result)
        for ds in result.datasets:
            ctx.budget.phases[f"evaluate:{ds.name}"] = ds.seconds
        return not result.partial
