"""``magnitude_prune``: keep the largest-magnitude entries of each task vector, then a weighted sum (PEFT's magnitude_prune)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import KEEP_COUNT, SCALE, WEIGHTS, Param


class MagnitudePrune(TaskVectorMerge):
    """Magnitude pruning: keep each task vector's top-k entries by |τ|, then λ Σ wᵢτ̂ᵢ."""

    hyperparameters = {
        "density": Param(0.5, "fraction of entries kept per task vector, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "weights": WEIGHTS,
        "scale": SCALE,
        "keep_count": KEEP_COUNT,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.magnitude_prune(task_vectors, density=h["density"], weights=h["weights"],
                                   scale=h["scale"], keep_count=h["keep_count"])
