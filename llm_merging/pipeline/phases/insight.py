"""Insight phases: ``--analyze`` (task-vector analysis of the experts: analysis.json, plots) and
``--baselines`` (the base and each expert evaluated alone, normalised scores)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llm_merging.core.errors import BudgetExceeded, ConfigError
from llm_merging.insight.analysis import analyze_method, write_analysis
from llm_merging.insight.baselines import run_baselines
from llm_merging.pipeline.config import RunConfig
from llm_merging.pipeline.context import Phase, RunContext


class AnalyzePhase(Phase):
    name = "analyze"
    section = "analysis"
    needs_weights = False  # it reads the experts and the base from their files

    def enabled(self, config: RunConfig) -> bool:
        return config.insight.analyze

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        return ["analysis.json"]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        return [(ctx.out_dir, 32 << 20, "analysis.json and plots")]

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        doc = analyze_method(ctx.method, device=ctx.method.torch_device(), progress=ctx.config.progress,
                             should_stop=ctx.budget.expired)
        doc["models"] = ctx.report.get("models")
        write_analysis(doc, ctx.out_dir)
        ctx.report["analysis"] = {"path": "analysis.json", "plots": doc.get("plots"), "partial": doc["partial"],
                                  "seconds": doc["seconds"], "verdicts": doc["verdicts"], "overall": doc["overall"]}
        if doc["partial"]:
            raise BudgetExceeded(f"time budget of {ctx.config.time_budget:g} s ran out during the analysis; "
                                 f"what was analysed is in analysis.json")
        return ctx.report["analysis"]


class BaselinesPhase(Phase):
    name = "baselines"
    timed = False  # each model alone is timed as baseline:<label>

    def enabled(self, config: RunConfig) -> bool:
        return config.insight.baselines

    def check(self, ctx: RunContext) -> None:
        recipe = ctx.method.recipe
        if recipe is not None and recipe.tokenizer:
            raise ConfigError(f"--baselines: the recipe {ctx.config.recipe} sets an output tokenizer, so the merged "
                              f"model's vocabulary differs from the experts'; run the baselines without it")

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        return ["baselines/"]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        models = 1 + len((ctx.report.get("models") or {}).get("experts") or [])
        rows = sum(len(r) for r in ctx.examples)
        return [(ctx.out_dir, models * ((1 << 20) + 4096 * rows), "the baselines' predictions")]

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        return run_baselines(ctx)
