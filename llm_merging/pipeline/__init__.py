"""The pipeline: one run configuration (`RunConfig`), a run context (`RunContext`), phases that plug in
(`Phase`, `default_phases`) and the `Runner` that walks them under one wall-clock budget."""
from llm_merging.merging.factory import CalibrationConfig
from llm_merging.pipeline.config import DEFAULT_DATASETS, SAVE_MODES, InsightConfig, LMEvalConfig, RunConfig, SearchConfig
from llm_merging.pipeline.context import Phase, RunContext
from llm_merging.pipeline.phases import default_phases
from llm_merging.pipeline.runner import Runner, build_method

__all__ = ["RunConfig", "SearchConfig", "LMEvalConfig", "CalibrationConfig", "InsightConfig", "RunContext", "Phase",
           "Runner", "default_phases", "build_method", "DEFAULT_DATASETS", "SAVE_MODES"]
