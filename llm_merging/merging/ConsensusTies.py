"""``consensus_ties``: Consensus Merging on TIES-Merging (Wang et al., ICML 2024, "Localizing Task Information
for Improved Model Merging and Compression")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.ConsensusTa import CONSENSUS_K, TALL_LAMBDA
from llm_merging.merging.hparams import CONSENSUS, DENSITY, SCALE, Param
from llm_merging.merging.TiesMerge import KEEP_COUNT


class ConsensusTies(TaskVectorMerge):
    """Consensus TIES: TIES (disjoint sum) kept where at least k experts' TALL masks agree (Wang et al. 2024)."""

    hyperparameters = {
        "k": CONSENSUS_K,
        "tall_lambda": TALL_LAMBDA,
        "density": DENSITY,
        "scale": SCALE,
        "sign_method": CONSENSUS["sign_method"],
        "divisor": Param("none", "TIES disjoint merge: the sum of the agreeing entries (none, the reference's "
                                 "dis-sum) or their mean (count, the TIES paper's)", kind=str,
                         choices=("none", "count")),
        "keep_count": KEEP_COUNT,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        return ops.consensus_ties(
            task_vectors, k=h["k"], tall_lambda=h["tall_lambda"], density=h["density"], scale=h["scale"],
            sign_method=h["sign_method"], divisor=None if h["divisor"] == "none" else h["divisor"],
            keep_count=h["keep_count"],
        )
