"""``della``: DELLA-Merging (Deep et al. 2024): MagPrune drop-and-rescale, then TIES sign consensus."""
from __future__ import annotations

from llm_merging.merging.DellaLinear import DellaLinear
from llm_merging.merging.hparams import CONSENSUS


class Della(DellaLinear):
    """DELLA: drop entries with probabilities ranked by magnitude, rescale, TIES consensus (Deep et al. 2024)."""

    consensus = "ties"
    hyperparameters = {**DellaLinear.hyperparameters, **CONSENSUS}

