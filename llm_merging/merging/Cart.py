"""``cart``: CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging", arXiv:2412.12153):
centred task vectors, each truncated to low rank, added to the average: θ_avg + λ Σᵢ SVD_k(θᵢ − θ_avg).

Following the reference (``JH-GEECS/CART``, ``src/merging.py``): the rank is a fraction of min(m, n)
(``rank_ratio``, k = max(1, int(ratio·min(m, n)))), λ multiplies the sum over tasks, and only the matrices of the
attention and MLP blocks are truncated; every other tensor (embeddings, head, norms, biases) gets the plain
average. Defaults: the reference's 8-task setting (ViT-B/32: ``prior`` 2.0, ``initial_rank_ratio`` 0.12).
"""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging import settings
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import Param


class Cart(TaskVectorMerge):
    """CART (Choi et al. 2024): weight average plus low-rank centred task vectors, θ_avg + λ Σ SVD_k(θᵢ − θ_avg)."""

    hyperparameters = {
        "rank_ratio": Param(0.12, "fraction of min(m, n) singular triplets kept per centred matrix (0: the plain "
                                  "average; 1: whole matrices, which also give the average)", low=0.0, high=1.0),
        "scale": Param(2.0, "λ (the reference's prior) multiplying the sum of the truncated centred task vectors",
                       low=0.0),
        "rank_by": Param("count", "the rank: a count fraction of min(m, n) (count) or the fraction of the energy "
                                  "Σσ² kept (energy, the reference's energy_threshold)",
                         kind=str, choices=("count", "energy")),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        in_block = settings.layer_index(name) is not None  # the matrices of the attention and MLP blocks
        return ops.cart(task_vectors, rank_ratio=h["rank_ratio"], scale=h["scale"], low_rank=in_block,
                        rank_by=h["rank_by"])
