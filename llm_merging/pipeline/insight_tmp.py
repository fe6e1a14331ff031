"""Insight phases of a run (``--analyze``, ``--baselines``) and the run's ``report.html``: the runner calls
`check_config` in preflight, `run` after the evaluation, and `write_report_html` after report.json."""
from __future__ import annotations

import logging

from llm_merging.core.errors import BudgetExceeded

logger = logging.getLogger(__name__)


def check_config(cfg, method) -> None:
    """Preflight checks of the insight flags (before any weights are loaded)."""
    if getattr(cfg, "baselines", False):
        from llm_merging.insight.baselines import check_config as check_baselines

        check_baselines(cfg, method)


def run(runner) -> None:
    """``--analyze`` (task-vector analysis: OUT/METHOD/analysis.json, plots) then ``--baselines`` (the base
    and each expert evaluated alone), inside the run's budget; BudgetExceeded when it stops them."""
    cfg = runner.cfg
    if getattr(cfg, "analyze", False):
        from llm_merging.insight.analysis import analyze_method, write_analysis

        runner._check_budget("analyze")
        with runner.budget.phase("analyze"):
            doc = analyze_method(runner.method, device=runner.method.torch_device(), progress=cfg.progress,
                                 should_stop=runner.budget.expired)
            doc["models"] = runner.report.get("models")
            write_analysis(doc, runner.out_dir)
        runner.report["analysis"] = {"path": "analysis.json", "plots": doc.get("plots"), "partial": doc["partial"],
                                     "seconds": doc["seconds"], "verdicts": doc["verdicts"],
                                     "overall": doc["overall"]}
        if doc["partial"]:
            raise BudgetExceeded(f"time budget of {cfg.time_budget:g} s ran out during the analysis; "
                                 f"what was analysed is in analysis.json")
    if getattr(cfg, "baselines", False):
        from llm_merging.insight.baselines import run_baselines

        runner._check_budget("baselines")
        run_baselines(runner)


def write_report_html(runner) -> None:
    """``report.html`` next to report.json; a failure is logged and never changes the run's exit status."""
    try:
        from llm_merging.report.html import write_html_report

        path = write_html_report(runner.out_dir, runner.report)
        logger.debug("wrote %s", path)
    except KeyboardInterrupt:  # the run's status stands; only the page is missing
        logger.warning("report.html not written: interrupted")
    except Exception as exc:  # drawing must never fail a run
        logger.error("cannot write report.html in %s: %s: %s", runner.out_dir, type(exc).__name__, exc)
        logger.debug("report.html failure", exc_info=True)
