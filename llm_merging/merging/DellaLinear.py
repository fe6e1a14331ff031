"""``della_linear``: DELLA-Merging's MagPrune (Deep et al. 2024), then a weighted sum."""
from __future__ import annotations

import torch

from .. import ops
from ..model.engine import param_seed
from .hparams import SCALE, WEIGHTS, Param, consensus_kwargs, per_model
from .Linear import Linear


class DellaLinear(Linear):
    """DELLA: drop entries with probabilities ranked by magnitude, rescale, weighted sum (Deep et al. 2024)."""

    consensus: str | None = None
    hyperparameters = {
        "density": Param(0.7, "average keep probability, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "epsilon": Param(0.1, "spread of keep probabilities around density (MagPrune)", per_model=True, low=0.0),
        "weights": WEIGHTS,
        "scale": SCALE,
    }

    def __init__(self, name: str | None = "della_linear") -> None:
        super().__init__(name)

    def validate_hyperparameters(self) -> None:
        """Also reject density/epsilon pairs whose probabilities leave [0, 1], before any loading."""
        super().validate_hyperparameters()
        n = max(len(self.model_refs()), 1)
        for d, e in zip(per_model(self.hparams["density"], n), per_model(self.hparams["epsilon"], n)):
            ops.della([torch.arange(1.0, 5.0)], density=d, epsilon=e, consensus=None)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        n, h = len(task_vectors), self.hparams
        extra = consensus_kwargs(h) if self.consensus else {}
        return ops.della(
            task_vectors, density=per_model(h["density"], n), epsilon=per_model(h["epsilon"], n),
            weights=per_model(h["weights"], n), scale=h["scale"], consensus=self.consensus,
            seed=param_seed(self.seed, name), **extra,
        )
