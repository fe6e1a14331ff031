"""``dare_ties``: DARE drop-and-rescale, then TIES sign consensus (Yu et al. 2024, "Language Models are Super Mario")."""
from __future__ import annotations

import torch

from .. import ops
from ..model.engine import param_seed
from .hparams import SCALE, WEIGHTS, Param, per_model
from .Linear import Linear

class DareTies(Linear):
    """DARE (Yu et al. 2024): random drop with keep probability p, rescale by 1/p, then TIES consensus."""

    hyperparameters = {
        "density": Param(0.5, "probability p of keeping each entry, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "weights": WEIGHTS,
        "scale": SCALE,
        "rescale": Param("inverse", "rescale of kept entries: inverse (1/p, paper) | l1 (mergekit norm-preserving) | none", kind=str, choices=("inverse", "l1", "none")),
        "sign_method": Param("total", "sign election: total | frequency", kind=str, choices=("total", "frequency")),
        "weighted_sign": Param(False, "elect signs on weighted task vectors (mergekit)", kind=bool),
        "divisor": Param("count", "disjoint mean divisor: count (paper) | weight_sum (mergekit)", kind=str, choices=("count", "weight_sum")),
    }

    def __init__(self, name: str | None = "dare_ties") -> None:
        super().__init__(name)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        n, h = len(task_vectors), self.hparams
        return ops.dare(
            task_vectors, density=per_model(h["density"], n), weights=per_model(h["weights"], n), scale=h["scale"],
            consensus='ties', rescale=None if h["rescale"] == "none" else h["rescale"],
            seed=param_seed(self.seed, name), sign_method=h["sign_method"], weighted_sign=h["weighted_sign"], divisor=h["divisor"],
        )
