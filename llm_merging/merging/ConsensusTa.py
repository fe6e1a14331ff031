"""``consensus_ta``: Consensus Merging on task arithmetic (Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, Param

CONSENSUS_K = Param(2, "keep the entries at least k experts' TALL masks mark (0: no pruning; 1: drop catastrophic "
                       "weights; 2: also selfish ones; the reference's prun_thre_k)", kind=int, low=0)
TALL_LAMBDA = Param(0.6, "λᵢ of the TALL masks |τᵢ| > λᵢ·|τ_MTL − τᵢ| (the paper picks λᵢ in [0.2, 0.6] on "
                         "validation data; 0.6, FusionBench's default, data-free)", per_model=True, low=0.0)


class ConsensusTa(TaskVectorMerge):
    """Consensus TA: task arithmetic kept where at least k experts' TALL masks agree (Wang et al. 2024)."""

    elementwise = True

    hyperparameters = {"k": CONSENSUS_K, "tall_lambda": TALL_LAMBDA, "scale": SCALE}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.consensus_ta(task_vectors, k=h["k"], tall_lambda=h["tall_lambda"], scale=h["scale"])
