"""``task_arithmetic``: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
from __future__ import annotations

import torch

from .. import ops
from .hparams import SCALE, WEIGHTS
from .base import TaskVectorMerge


class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023)."""

    hyperparameters = {"weights": WEIGHTS, "scale": SCALE}


    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.task_arithmetic(task_vectors, weights=self.hparams["weights"], scale=self.hparams["scale"])
