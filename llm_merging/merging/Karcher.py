"""``karcher``: Karcher (Riemannian) mean of the models' weights on the hypersphere, rescaled (mergekit ``karcher``)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Karcher(TaskVectorMerge):
    """Karcher mean (mergekit): iterative spherical mean of the base and expert weights, equal weights."""

    base_optional = True  # without a base: the mean of the models themselves (the first is the template)

    hyperparameters = {
        "max_iter": Param(10, "maximum iterations", kind=int, low=1),
        "tol": Param(1e-5, "stop when the tangent step is below tol (absolute)", low=0.0, low_open=True),
        "include_base": Param(True, "average the base model with the experts (mergekit adds it to the inputs); "
                                    "no effect without a base model", kind=bool),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        # without a base the template is the first model, already among the experts (τ = 0)
        models = ([base] if h["include_base"] and not self.base_free else []) + [base + tv for tv in task_vectors]
        return ops.karcher(models, max_iter=h["max_iter"], tol=h["tol"]) - base
