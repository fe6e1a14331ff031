"""``pcb_merging``: PCB-Merging (Du et al., NeurIPS 2024, "Parameter Competition Balancing for Model Merging")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, WEIGHTS, Param
from llm_merging.ops.pcb import PCB_CLAMP


class PcbMerging(TaskVectorMerge):
    """PCB-Merging: intra- and inter-balancing scores, drop all but the top ratio, score-weighted mean (Du et al. 2024)."""

    hyperparameters = {
        "ratio": Param(0.1, "fraction of each task vector's entries kept by balancing score, in (0, 1] (the "
                            "reference's pcb_ratio; its PCB_merge default)", low=0.0, high=1.0, low_open=True),
        "weights": WEIGHTS,  # the reference's per-task λ ("lams")
        "scale": SCALE,
        "clamp": Param(PCB_CLAMP, "fraction of each task vector's smallest and largest magnitudes clipped before "
                                  "scoring, in [0, 0.1] (the reference's 1e-4; its NLP scripts' 0.01)", low=0.0,
                       high=0.1),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.pcb(task_vectors, ratio=h["ratio"], weights=h["weights"], scale=h["scale"], clamp=h["clamp"])
