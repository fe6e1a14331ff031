"""``nuslerp``: NuSLERP of two models' task vectors (mergekit ``nuslerp``), ``t = w₁ / (w₀ + w₁)``."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import WEIGHTS, Param


class Nuslerp(TaskVectorMerge):
    """NuSLERP (mergekit): spherical interpolation of two task vectors, t from the weights, per tensor or per row."""

    expert_count = (2, 2)
    base_optional = True  # without a base (mergekit too): the two models' weights are interpolated directly

    hyperparameters = {
        "weights": WEIGHTS,
        "nuslerp_flatten": Param(True, "one vector per tensor (false: one per row, or per column with row_wise)", kind=bool),
        "nuslerp_row_wise": Param(False, "with flatten=false: interpolate the columns (mergekit's naming)", kind=bool),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        if self.base_free:  # the weights themselves: θ = nuslerp(θ₁, θ₂), returned as θ − θ_template
            models = [base + tv for tv in task_vectors]
            return ops.nuslerp(models, h["weights"], row_wise=h["nuslerp_row_wise"],
                               flatten=h["nuslerp_flatten"]).sub_(base)
        return ops.nuslerp(task_vectors, h["weights"], row_wise=h["nuslerp_row_wise"], flatten=h["nuslerp_flatten"])
