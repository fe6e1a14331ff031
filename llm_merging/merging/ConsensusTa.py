"""``consensus_ta``: Consensus Merging on task arithmetic (Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import CONSENSUS_K, SCALE, TALL_LAMBDA


class ConsensusTa(TaskVectorMerge):
    """Consensus TA: task arithmetic kept where at least k experts' TALL masks agree (Wang et al. 2024)."""

    elementwise = True

    hyperparameters = {"k": CONSENSUS_K, "tall_lambda": TALL_LAMBDA, "scale": SCALE}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.consensus_ta(task_vectors, k=h["k"], tall_lambda=h["tall_lambda"], scale=h["scale"])
