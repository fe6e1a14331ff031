"""``ties_merge``: TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import CONSENSUS, DENSITY, KEEP_COUNT, SCALE, WEIGHTS, consensus_kwargs
from llm_merging.ops.streaming import reader_chunk, ties_chunks


class TiesMerge(TaskVectorMerge):
    """TIES-Merging: trim to top-k, elect signs, disjoint mean (Yadav et al. 2023)."""

    hyperparameters = {
        "density": DENSITY,
        "weights": WEIGHTS,
        "scale": SCALE,
        **CONSENSUS,
        "keep_count": KEEP_COUNT,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.ties(
            task_vectors, density=h["density"], weights=h["weights"], scale=h["scale"],
            keep_count=h["keep_count"], **consensus_kwargs(h),
        )

    def merge_chunks(self, name: str, read, numel: int, n_models: int):
        h = self.hparams
        return ties_chunks(read, numel, density=h["density"], weights=h["weights"], scale=h["scale"],
                           n_models=n_models, keep_count_mode=h["keep_count"], chunk=reader_chunk(read),
                           **consensus_kwargs(h))
