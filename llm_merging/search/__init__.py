"""Search: find the best merge within the time budget, on held-out data (``--search``).

:mod:`.space` parses and checks the search space, :mod:`.candidates` merges and scores candidates in
memory, :mod:`.study` runs the Optuna study and writes ``OUTPUT/METHOD/search/``.
"""
from llm_merging.search.space import SearchSpace, build_space
from llm_merging.search.study import SearchConfig, prepare, run

__all__ = ["SearchConfig", "SearchSpace", "build_space", "prepare", "run"]
