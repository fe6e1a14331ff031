"""The search phase (``--search``): the best candidate on held-out data becomes the run's method."""
from __future__ import annotations

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
        """Space, methods, search data and storage checked before any weight is loaded."""
        self.search = search.prepare(ctx)

    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        ctx.report["search"] = self.search.report  # filled in as it goes, also when the budget stops it
        return search.run(ctx, self.search)
