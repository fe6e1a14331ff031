"""``expo``: ExPO, model extrapolation (Zheng et al. 2024, "Weak-to-Strong Extrapolation Expedites Alignment")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Expo(TaskVectorMerge):
    """ExPO: θ_aligned + α(θ_aligned − θ_sft), the one expert aligned, the base its SFT model (Zheng et al. 2024)."""

    expert_count = (1, 1)
    elementwise = True

    hyperparameters = {
        "alpha": Param(0.3, "extrapolation α > 0 (the reference README: 0.3 or 0.5 is usually good); the same as "
                            "task_arithmetic with scale 1 + α", low=0.0, low_open=True),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.expo(task_vectors[0], alpha=self.hparams["alpha"])
