"""``multislerp``: barycentric interpolation of any number of task vectors on the hypersphere (mergekit ``multislerp``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import WEIGHTS, Param


class Multislerp(TaskVectorMerge):
    """Multi-SLERP (mergekit): weighted mean direction of the task vectors, scaled to their weighted mean norm."""

    base_optional = True  # without a base (mergekit too): the models' weights themselves on the hypersphere

    hyperparameters = {
        "weights": WEIGHTS,
        "normalize_weights": Param(True, "divide the weights by their sum", kind=bool),
        "eps": Param(1e-8, "numerical floor of norms", low=0.0, low_open=True),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        if self.base_free:  # θ = multislerp(θ₁ … θₙ), returned as θ − θ_template
            models = [base + tv for tv in task_vectors]
            return ops.multislerp(models, h["weights"], normalize_weights=h["normalize_weights"],
                                  eps=h["eps"]).sub_(base)
        return ops.multislerp(task_vectors, h["weights"], normalize_weights=h["normalize_weights"], eps=h["eps"])
