"""The pipeline's run configuration and runner under their earlier import path (``llm_merging.runner``)."""
from llm_merging.pipeline import RunConfig, Runner

__all__ = ["RunConfig", "Runner"]
