"""``dare_ties``: DARE drop-and-rescale, then TIES sign consensus (Yu et al. 2024)."""
from __future__ import annotations

from llm_merging.merging.DareLinear import DareLinear
from llm_merging.merging.hparams import CONSENSUS


class DareTies(DareLinear):
    """DARE (Yu et al. 2024): random drop with keep probability p, rescale by 1/p, then TIES consensus."""

    consensus = "ties"
    hyperparameters = {**DareLinear.hyperparameters, **CONSENSUS}

