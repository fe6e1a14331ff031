"""``report.html`` next to report.json, written once the run ended, whatever its status."""
from __future__ import annotations

import logging
from pathlib import Path

from llm_merging.pipeline.context import Phase, RunContext
from llm_merging.report import html

logger = logging.getLogger(__name__)


class HtmlReportPhase(Phase):
    name = "report"
    needs_weights = False
    checks_budget = False  # it only writes the page, in finish
    timed = False

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        return ["report.html"]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        return [(ctx.out_dir, 2 << 20, "report.html and its plots")]

    def finish(self, ctx: RunContext) -> None:
        """A failure is logged and never changes the run's exit status."""
        if not ctx.preflight_ok or not ctx.processes.is_main or not ctx.out_dir.is_dir():
            return
        try:
            path = html.write_html_report(ctx.out_dir, ctx.report)
            logger.debug("wrote %s", path)
        except KeyboardInterrupt:  # the run's status stands; only the page is missing
            logger.warning("report.html not written: interrupted")
        except Exception as exc:  # drawing must never fail a run
            logger.error("cannot write report.html in %s: %s: %s", ctx.out_dir, type(exc).__name__, exc)
            logger.debug("report.html failure", exc_info=True)
