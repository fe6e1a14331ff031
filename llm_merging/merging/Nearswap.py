"""``nearswap``: take the expert's value where it is near the base, move t towards it elsewhere (mergekit ``nearswap``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Nearswap(TaskVectorMerge):
    """NearSwap (mergekit): the expert's value within t of the base, else a step of t towards it; 1 expert."""

    expert_count = (1, 1)
    needs_base_because = "it moves the base towards the model where the two are near"

    hyperparameters = {"t": Param(None, "similarity threshold (required, e.g. 0.0001)", low=0.0)}

    def validate_hyperparameters(self) -> None:
        if self.hparams.get("t") is None:
            raise ConfigError(f"method '{self.name}' needs t (e.g. --set t=0.0001)")
        super().validate_hyperparameters()

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.nearswap(base, base + task_vectors[0], self.hparams["t"]) - base
