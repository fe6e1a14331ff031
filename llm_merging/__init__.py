"""llm_merging: build one generalist LLM out of expert models by merging their weights, no training.

Library use::

    from llm_merging import ops            # merge math on tensors (ties, dare, slerp, ...)
    from llm_merging.merging import Merges, get_method_class
    from llm_merging.pipeline.runner import RunConfig, Runner
"""
__version__ = "0.1.0"

from llm_merging.core import errors  # noqa: F401


def __getattr__(name):  # lazy: importing the package must stay cheap (torch loads on first use)
    import importlib

    if name in ("ops", "merging", "model", "data", "evaluation", "metrics", "runner", "tiny"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'llm_merging' has no attribute {name!r}")
