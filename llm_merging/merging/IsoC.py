"""``iso_c``: Iso-C (Marczak et al. 2025): flatten the spectrum of the summed task matrix."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE


class IsoC(TaskVectorMerge):
    """Iso-C (Marczak et al. 2025): Σ τᵢ = UΣVᵀ replaced by σ̄·UVᵀ (isotropic spectrum)."""

    hyperparameters = {
        "scale": SCALE,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.iso_c(task_vectors, scale=self.hparams["scale"])
