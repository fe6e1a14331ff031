"""``ram``: Reinforced Agent Merging (arXiv:2601.13572; mergekit ``ram``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param

EPSILON = Param(1e-5, "an entry is active when |τ| > epsilon", low=0.0)


class Ram(TaskVectorMerge):
    """RAM: each entry from the only expert that changes it, or the mean of those that do."""

    hyperparameters = {"epsilon": EPSILON}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.ram(task_vectors, epsilon=self.hparams["epsilon"])
