"""``task_arithmetic``: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
from __future__ import annotations

import torch

from .. import ops
from .hparams import SCALE, WEIGHTS, per_model
from .Linear import Linear


class TaskArithmetic(Linear):
    """Task arithmetic: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023)."""

    hyperparameters = {"weights": WEIGHTS, "scale": SCALE}

    def __init__(self, name: str | None = "task_arithmetic") -> None:
        super().__init__(name)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        weights = per_model(self.hparams["weights"], len(task_vectors))
        return ops.task_arithmetic(task_vectors, weights=weights, scale=self.hparams["scale"])
