"""The search phase (``--search``): the best candidate on held-out data becomes the run's method."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llm_merging import search
from llm_merging.pipeline.config import RunConfig
from llm_merging.pipeline.context import Phase, RunContext


class SearchPhase(Phase):
    name = "search"
    needs_weights = False  # it runs before the merge

    def __init__(self) -> None:
        self.search: search.Search | None = None

    def enabled(self, config: RunConfig) -> bool:
        return config.search is not None

    def check(self, ctx: RunContext) -> None:
        """Space, methods, search data and storage checked before any weight is loaded; the output folder of
        every searched method held (process 0), so that the best one's is not refused after the search."""
        self.search = search.prepare(ctx)
        if ctx.processes.is_main:
            for method in self.search.methods.values():
                ctx.hold_output_folder(ctx.method_folder(method))

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        where = os.path.relpath(self.search.dir, ctx.out_dir) if self.search is not None else "search"
        return [f"{where}/trials.csv", f"{where}/best.yml"]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        """The study's journal, trials and plots; the largest temporary spill of a searched method."""
        needs = [(ctx.out_dir, 16 << 20, "the search journal, trials and plots")]
        spills = [need for m in (self.search.methods.values() if self.search is not None else [])
                  for need in m.scratch_space()]
        if spills:
            folder, n, what = max(spills, key=lambda need: need[1])
            needs.append((Path(folder), n, what))
        return needs

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        ctx.report["search"] = self.search.report  # filled in as it goes, also when the budget stops it
        return search.run(ctx, self.search)
