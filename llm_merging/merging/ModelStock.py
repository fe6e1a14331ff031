"""``model_stock``: Model Stock (Jang et al. 2024): interpolate the expert average towards the base by the task vectors' angle."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class ModelStock(TaskVectorMerge):
    """Model Stock (Jang et al. 2024): θ₀ + t·mean(τᵢ), t = N·cosθ / (1 + (N−1)·cosθ)."""

    expert_count = (2, None)
    needs_base_because = "it moves the models' average towards the base by the angle between their task vectors"

    hyperparameters = {
        "filter_wise": Param(False, "one ratio per output row instead of per tensor", kind=bool),
        "extrapolate": Param(False, "mergekit's t for a negative mean cosine (t < 0: away from the average) instead of "
                                    "clamping it to 0 (t = 0: the base)", kind=bool),
    }


    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.model_stock(task_vectors, filter_wise=self.hparams["filter_wise"],
                               extrapolate=self.hparams["extrapolate"])
