"""``breadcrumbs_ties``: Model Breadcrumbs (Davari & Belilovsky 2023): drop the smallest and the largest-magnitude entries, then TIES consensus."""
from __future__ import annotations

import torch

from .. import ops
from .hparams import DENSITY, SCALE, WEIGHTS, Param, per_model
from .Linear import Linear

class BreadcrumbsTies(Linear):
    """Model Breadcrumbs: mask out small entries and outliers (top γ) of each task vector, then TIES consensus."""

    hyperparameters = {
        "density": Param(0.9, "fraction of entries kept before removing outliers, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "gamma": Param(0.01, "fraction of largest-magnitude outliers removed, in [0, 1)", per_model=True, low=0.0, high=1.0, high_open=True),
        "weights": WEIGHTS,
        "scale": SCALE,
        "sign_method": Param("total", "sign election: total | frequency", kind=str, choices=("total", "frequency")),
        "weighted_sign": Param(False, "elect signs on weighted task vectors (mergekit)", kind=bool),
        "divisor": Param("count", "disjoint mean divisor: count (paper) | weight_sum (mergekit)", kind=str, choices=("count", "weight_sum")),
    }

    def __init__(self, name: str | None = "breadcrumbs_ties") -> None:
        super().__init__(name)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        n, h = len(task_vectors), self.hparams
        return ops.breadcrumbs(
            task_vectors, density=per_model(h["density"], n), gamma=per_model(h["gamma"], n),
            weights=per_model(h["weights"], n), scale=h["scale"], consensus='ties', sign_method=h["sign_method"], weighted_sign=h["weighted_sign"], divisor=h["divisor"],
        )
