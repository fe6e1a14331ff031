"""``geometric_median``: the weighted geometric median of the task vectors (Weiszfeld's algorithm)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import WEIGHTS, Param


class GeometricMedian(TaskVectorMerge):
    """Geometric median of the task vectors per tensor (Weiszfeld iterations)."""

    base_optional = True  # the median is translation-equivariant: without a base, the median of the models

    hyperparameters = {
        "weights": WEIGHTS,
        "eps": Param(1e-6, "stop when the relative change is below eps", low=0.0, low_open=True),
        "max_iter": Param(100, "maximum Weiszfeld iterations", kind=int, low=1),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.geometric_median(task_vectors, weights=h["weights"], eps=h["eps"], max_iter=h["max_iter"])
