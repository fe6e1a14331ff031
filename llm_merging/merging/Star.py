"""``star``: STAR (Lee et al., NAACL 2025, "STAR: Spectral Truncation and Rescale for Model Merging"): each task
matrix truncated to the singular triplets holding η % of its nuclear norm, rescaled to its nuclear norm, averaged.

Following the reference (``IBM/STAR``, ``merger/STAR.py`` and ``runner/*.py``): η is a percentage (default 40,
the value of every script of the reference), the merge is the plain mean of the truncated matrices. Tensors
without a spectrum (1-D norms and biases) are averaged as they are. For LoRA experts the SVD of each update comes
from its factors (the reference's ``known_rank`` low-rank SVD, exact here: QR of B and Aᵀ and an r×r SVD).
"""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging import settings
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, Param


class Star(TaskVectorMerge):
    """STAR (Lee et al. 2025): spectral truncation to η % of the nuclear norm, rescale, average."""

    hyperparameters = {
        "eta": Param(40.0, "η: percentage of each task matrix's nuclear norm that the kept singular values hold",
                     low=0.0, high=100.0),
        "scale": SCALE,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        return ops.star(task_vectors, eta=self.hparams["eta"], scale=self.hparams["scale"],
                        factors=self.lora_factors(name, task_vectors))

    def lora_factors(self, name: str, task_vectors: list[torch.Tensor]) -> list | None:
        """``(B·s, A)`` of each expert whose task vector of ``name`` is exactly its LoRA product (else None for
        it): STAR takes their SVD from the factors (the reference's low-rank SVD for LoRA, exact here). Only
        for matrices inside the numbered layers (vocabulary tensors may be re-indexed by a recipe tokenizer)."""
        tv = task_vectors[0]
        if tv.dim() != 2 or settings.layer_index(name) is None or len(self.experts) != len(task_vectors):
            return None
        out = self.exact_factors(name, tv.device, tv.shape)
        return out if any(p is not None for p in out) else None
