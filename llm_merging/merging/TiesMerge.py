"""``ties_merge``: TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models")."""
from __future__ import annotations

import torch

from .. import ops
from .hparams import CONSENSUS, DENSITY, SCALE, WEIGHTS, consensus_kwargs, per_model
from .Linear import Linear


class TiesMerge(Linear):
    """TIES-Merging: trim to top-k, elect signs, disjoint mean (Yadav et al. 2023)."""

    hyperparameters = {
        "density": DENSITY,
        "weights": WEIGHTS,
        "scale": SCALE,
        **CONSENSUS,
    }

    def __init__(self, name: str | None = "ties_merge") -> None:
        super().__init__(name)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        n = len(task_vectors)
        h = self.hparams
        return ops.ties(
            task_vectors, density=per_model(h["density"], n), weights=per_model(h["weights"], n), scale=h["scale"],
            **consensus_kwargs(h),
        )
