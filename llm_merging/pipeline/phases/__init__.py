"""The phases of a run, and `default_phases`: the list the runner walks unless it is given another.

Adding a phase: a module here with a `Phase` subclass, and one line in `default_phases`."""
from __future__ import annotations

from llm_merging.pipeline.context import Phase
from llm_merging.pipeline.phases.chain import ChainPhase
from llm_merging.pipeline.phases.evaluate import EvaluatePhase
from llm_merging.pipeline.phases.html_report import HtmlReportPhase
from llm_merging.pipeline.phases.insight import AnalyzePhase, BaselinesPhase
from llm_merging.pipeline.phases.merge import MergePhase
from llm_merging.pipeline.phases.save import SavePhase
from llm_merging.pipeline.phases.search import SearchPhase

__all__ = ["Phase", "default_phases", "SearchPhase", "ChainPhase", "MergePhase", "SavePhase", "EvaluatePhase", "AnalyzePhase",
           "BaselinesPhase", "HtmlReportPhase"]


def default_phases() -> list[Phase]:
    """A run's phases in order; each decides from the configuration whether it runs."""
    return [
        SearchPhase(),
        ChainPhase(),
        MergePhase(),
        SavePhase(),
        EvaluatePhase(),
        AnalyzePhase(),
        BaselinesPhase(),
        HtmlReportPhase(),
    ]
