"""``sce``: Select, Calculate, Erase (Wan et al. 2024, FuseChat; mergekit ``sce``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Sce(TaskVectorMerge):
    """SCE (FuseChat): keep high-variance entries, weight models by their energy, erase sign conflicts."""

    hyperparameters = {
        "select_topk": Param(1.0, "fraction of entries kept by variance across models, in (0, 1]", low=0.0, high=1.0,
                             low_open=True),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.sce(task_vectors, select_topk=self.hparams["select_topk"])
