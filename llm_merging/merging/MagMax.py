"""``magmax``: MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param
from llm_merging.ops.magmax import TIE_BREAKS


class MagMax(TaskVectorMerge):
    """MagMax: per entry the task-vector value of largest magnitude (ties: lowest expert index), times λ (Marczak et al. 2024)."""

    elementwise = True

    hyperparameters = {
        "scale": Param(0.5, "scaling λ of the selected task vector (the reference scripts' 0.5)", low=0.0),
        "tie_break": Param("first", "equal magnitudes: the lowest expert index (first) or the highest (last, the "
                                    "reference's >=)", kind=str, choices=TIE_BREAKS),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.magmax(task_vectors, scale=h["scale"], tie_break=h["tie_break"])
