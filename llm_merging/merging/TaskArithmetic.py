"""``task_arithmetic``: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023, "Editing Models with Task Arithmetic")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.hparams import SCALE, WEIGHTS, Param
from llm_merging.merging.base import TaskVectorMerge

# mergekit ``normalize`` for its linear (no consensus) variants: divide the weighted sum by the sum of all the
# weights (left as is where that sum is below 1e-8, as mergekit). The TIES variants override this with the
# consensus divisor.
LINEAR_DIVISOR = Param("none", "divide the weighted sum by the sum of the weights (weight_sum: mergekit normalize: true) "
                               "or not (none)", kind=str, choices=("none", "weight_sum"))


def divide_by_weight_sum(merged, weights):
    """``merged / Σ wᵢ`` (mergekit's normalize without consensus; unchanged where |Σ wᵢ| < 1e-8)."""
    total = float(sum(weights))
    return merged if abs(total) < 1e-8 else merged / total


class TaskArithmetic(TaskVectorMerge):
    """Task arithmetic: θ₀ + λ Σ wᵢτᵢ (Ilharco et al. 2023)."""

    elementwise = True

    hyperparameters = {"weights": WEIGHTS, "scale": SCALE, "divisor": LINEAR_DIVISOR}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        out = ops.task_arithmetic(task_vectors, weights=h["weights"], scale=h["scale"])
        return divide_by_weight_sum(out, h["weights"]) if h["divisor"] == "weight_sum" else out
