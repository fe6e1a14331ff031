"""``breadcrumbs``: Model Breadcrumbs (Davari & Belilovsky 2023): drop the smallest and the largest entries."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import KEEP_COUNT, LINEAR_DIVISOR, SCALE, WEIGHTS, Param, consensus_kwargs
from llm_merging.ops.basic import divide_by_weight_sum


class Breadcrumbs(TaskVectorMerge):
    """Model Breadcrumbs: mask out small entries and outliers (top γ) of each task vector, weighted sum."""

    consensus: str | None = None
    hyperparameters = {
        "density": Param(0.9, "fraction of entries kept before removing outliers, in (0, 1]", per_model=True,
                         low=0.0, high=1.0, low_open=True),
        "gamma": Param(0.01, "fraction of largest-magnitude outliers removed, in [0, 1)", per_model=True,
                       low=0.0, high=1.0, high_open=True),
        "weights": WEIGHTS,
        "scale": SCALE,
        "keep_count": KEEP_COUNT,
        "divisor": LINEAR_DIVISOR,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        extra = consensus_kwargs(h) if self.consensus else {}
        out = ops.breadcrumbs(
            task_vectors, density=h["density"], gamma=h["gamma"], weights=h["weights"], scale=h["scale"],
            consensus=self.consensus, keep_count=h["keep_count"], **extra,
        )
        if not self.consensus and h["divisor"] == "weight_sum":
            out = divide_by_weight_sum(out, h["weights"])
        return out
