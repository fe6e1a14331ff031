"""``consensus_ties``: Consensus Merging on TIES-Merging (Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import (
    CONSENSUS,
    CONSENSUS_K,
    DENSITY,
    KEEP_COUNT,
    SCALE,
    TALL_DIVISOR,
    TALL_LAMBDA,
    consensus_kwargs,
)


class ConsensusTies(TaskVectorMerge):
    """Consensus TIES: TIES (disjoint sum) kept where at least k experts' TALL masks agree (Wang et al. 2024)."""

    hyperparameters = {
        "k": CONSENSUS_K,
        "tall_lambda": TALL_LAMBDA,
        "density": DENSITY,
        "scale": SCALE,
        "sign_method": CONSENSUS["sign_method"],
        "divisor": TALL_DIVISOR,
        "keep_count": KEEP_COUNT,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.consensus_ties(
            task_vectors, k=h["k"], tall_lambda=h["tall_lambda"], density=h["density"], scale=h["scale"],
            keep_count=h["keep_count"], **consensus_kwargs(h),
        )
