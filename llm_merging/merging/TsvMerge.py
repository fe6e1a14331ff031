"""``tsv_merge``: Task Singular Vectors merge (Gargiulo et al., CVPR 2025): low-rank task matrices, decorrelated."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, Param


class TsvMerge(TaskVectorMerge):
    """TSV-Merge (Gargiulo et al. 2025): per-task top singular vectors, orthogonalised, recombined."""

    hyperparameters = {
        "scale": SCALE,
        "rank_per_task": Param(None, "singular vectors kept per task (default min(m, n) / number of tasks)", kind=int, low=1, optional=True),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.tsv(task_vectors, scale=self.hparams["scale"], rank_per_task=self.hparams["rank_per_task"])
