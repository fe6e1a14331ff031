"""``della``: DELLA-Merging (Deep et al. 2024): magnitude-ranked stochastic drop (MagPrune), then TIES consensus."""
from __future__ import annotations

import torch

from .. import ops
from ..model.engine import param_seed
from .hparams import SCALE, WEIGHTS, Param, per_model
from .Linear import Linear

class Della(Linear):
    """DELLA: drop entries with probabilities ranked by magnitude, rescale, TIES consensus (Deep et al. 2024)."""

    hyperparameters = {
        "density": Param(0.7, "average keep probability, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "epsilon": Param(0.1, "spread of drop probabilities around 1 - density (MagPrune)", per_model=True, low=0.0),
        "weights": WEIGHTS,
        "scale": SCALE,
        "sign_method": Param("total", "sign election: total | frequency", kind=str, choices=("total", "frequency")),
        "weighted_sign": Param(False, "elect signs on weighted task vectors (mergekit)", kind=bool),
        "divisor": Param("count", "disjoint mean divisor: count (paper) | weight_sum (mergekit)", kind=str, choices=("count", "weight_sum")),
    }

    def __init__(self, name: str | None = "della") -> None:
        super().__init__(name)

    def validate_hyperparameters(self) -> None:
        """Also reject density/epsilon pairs whose drop probabilities leave [0, 1], before any loading."""
        super().validate_hyperparameters()
        n = max(len(self.model_refs()), 1)
        h = self.hparams
        for d, e in zip(per_model(h["density"], n), per_model(h["epsilon"], n)):
            ops.della([torch.arange(1.0, 5.0)], density=d, epsilon=e, consensus=None)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        n, h = len(task_vectors), self.hparams
        return ops.della(
            task_vectors, density=per_model(h["density"], n), epsilon=per_model(h["epsilon"], n),
            weights=per_model(h["weights"], n), scale=h["scale"], consensus='ties',
            seed=param_seed(self.seed, name), sign_method=h["sign_method"], weighted_sign=h["weighted_sign"], divisor=h["divisor"],
        )
