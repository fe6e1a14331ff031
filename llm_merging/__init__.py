"""llm_merging: build one generalist LLM out of expert models by merging their weights, no training.

Library use::

    from llm_merging import ops            # merge math on tensors (ties, dare, slerp, ...)
    from llm_merging.merging import Merges, get_method_class
    from llm_merging.pipeline import RunConfig, Runner

Sub-packages are imported on first attribute access (``llm_merging.ops``), so that importing the package
stays cheap; the same lazy access loads the command line's commands (`llm_merging.cli`).
"""
__version__ = "0.1.0"

from llm_merging.core import errors  # noqa: F401

SUBMODULES = ("core", "ops", "model", "data", "merging", "evaluation", "metrics", "lm_eval_tasks", "search",
              "insight", "report", "pipeline", "runner", "cli")


def __getattr__(name):  # lazy: importing the package must stay cheap (torch loads on first use)
    import importlib

    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'llm_merging' has no attribute {name!r}")
