"""``ramplus_tl``: RAM+ with tensor-local rescaling of each expert's unique entries (mergekit ``ramplus_tl``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param
from llm_merging.merging.Ram import EPSILON


class RamplusTl(TaskVectorMerge):
    """RAM+ (tensor-local): RAM with each expert's unique entries amplified by 1 + r·clamp(ρ, 0, α)."""

    hyperparameters = {
        "r": Param(0.1, "amplification rate", low=0.0),
        "alpha": Param(0.2, "clamp of the shared/unique ratio ρ", low=0.0),
        "epsilon": EPSILON,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.ramplus_tl(task_vectors, r=h["r"], alpha=h["alpha"], epsilon=h["epsilon"])
