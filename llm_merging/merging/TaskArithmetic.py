"""``task_arithmetic``: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import LINEAR_DIVISOR, SCALE, WEIGHTS
from llm_merging.ops.basic import divide_by_weight_sum


class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023)."""

    elementwise = True

    hyperparameters = {"weights": WEIGHTS, "scale": SCALE, "divisor": LINEAR_DIVISOR}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        out = ops.task_arithmetic(task_vectors, weights=h["weights"], scale=h["scale"])
        return divide_by_weight_sum(out, h["weights"]) if h["divisor"] == "weight_sum" else out
