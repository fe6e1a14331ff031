"""``della_linear``: DELLA-Merging's MagPrune (Deep et al. 2024), then a weighted sum."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import LINEAR_DIVISOR, SCALE, WEIGHTS, Param, consensus_kwargs
from llm_merging.ops.basic import divide_by_weight_sum


class DellaLinear(TaskVectorMerge):
    """DELLA: drop entries with probabilities ranked by magnitude, rescale, weighted sum (Deep et al. 2024)."""

    consensus: str | None = None
    hyperparameters = {
        "density": Param(0.7, "average keep probability, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True),
        "epsilon": Param(0.1, "spread of keep probabilities around density (MagPrune)", per_model=True, low=0.0),
        "weights": WEIGHTS,
        "scale": SCALE,
        "rescale": Param("inverse", "rescale of kept entries: inverse (1/keep probability, paper) | l1 (mergekit) | none",
                         kind=str, choices=("inverse", "l1", "none")),
        "divisor": LINEAR_DIVISOR,
    }

    def check_values(self, values: dict) -> None:
        """Reject density/epsilon pairs whose probabilities leave [0, 1], before any loading."""
        for d, e in zip(values["density"], values["epsilon"]):
            ops.della([torch.arange(1.0, 5.0)], density=d, epsilon=e, consensus=None)

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        extra = consensus_kwargs(h) if self.consensus else {}
        out = ops.della(
            task_vectors, density=h["density"], epsilon=h["epsilon"],
            weights=h["weights"], scale=h["scale"], consensus=self.consensus,
            rescale=None if h["rescale"] == "none" else h["rescale"], seed=self.tensor_seed(name), **extra,
        )
        if not self.consensus and h["divisor"] == "weight_sum":
            out = divide_by_weight_sum(out, h["weights"])
        return out
