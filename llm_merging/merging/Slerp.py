"""``slerp``: spherical linear interpolation of two models (Shoemake 1985; mergekit's slerp)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Slerp(TaskVectorMerge):
    """SLERP of two experts: on their task vectors (default) or on their full weights."""

    expert_count = (2, 2)
    needs_base_because = "it interpolates task vectors (model − base), or from the base (t = 0) to one model (mergekit)"

    hyperparameters = {
        "t": Param(0.5, "interpolation factor: 0 gives the first model, 1 the second", low=0.0, high=1.0),
        "space": Param("task_vectors", "interpolate task vectors (θ₀ + slerp(τ₁, τ₂)) or full weights (slerp(θ₁, θ₂))", kind=str, choices=("task_vectors", "weights")),
    }


    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        t = self.hparams["t"]
        if self.hparams["space"] == "weights":
            return ops.slerp(base + task_vectors[0], base + task_vectors[1], t) - base
        return ops.slerp(task_vectors[0], task_vectors[1], t)
