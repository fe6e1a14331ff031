"""``arcee_fusion``: take the expert's value where its importance is an upper outlier (mergekit ``arcee_fusion``)."""
from __future__ import annotations

import torch

from .. import ops
from ..errors import ConfigError
from .base import TaskVectorMerge


class ArceeFusion(TaskVectorMerge):
    """Arcee Fusion (mergekit): keep the base except where the expert's change is an importance outlier; 1 expert."""

    hyperparameters: dict = {}

    def validate_hyperparameters(self) -> None:
        super().validate_hyperparameters()
        n = len(self.model_refs())
        if self.list_models is not None and n != 1:
            raise ConfigError(f"method '{self.name}' takes exactly 1 expert besides the base, got {n}")

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.arcee_fusion(base, base + task_vectors[0]) - base
