"""``arcee_fusion``: take the expert's value where its importance is an upper outlier (mergekit ``arcee_fusion``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge


class ArceeFusion(TaskVectorMerge):
    """Arcee Fusion (mergekit): keep the base except where the expert's change is an importance outlier; 1 expert."""

    expert_count = (1, 1)
    needs_base_because = "it keeps the base except where the model's change from it stands out"

    hyperparameters: dict = {}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.arcee_fusion(base, base + task_vectors[0]) - base
