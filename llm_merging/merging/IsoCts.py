"""``iso_cts``: Iso-CTS (Marczak et al. 2025): isotropic merge in a common plus task-specific subspace."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, Param


class IsoCts(TaskVectorMerge):
    """Iso-CTS (Marczak et al. 2025): common and task-specific subspaces, isotropic spectrum."""

    hyperparameters = {
        "scale": SCALE,
        "common_space_fraction": Param(0.8, "fraction of the rank given to the common subspace", low=0.0, high=1.0, low_open=True),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.iso_cts(task_vectors, common_space_fraction=h["common_space_fraction"], scale=h["scale"])
