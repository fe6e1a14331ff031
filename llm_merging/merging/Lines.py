"""``lines``: LiNeS merging (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging"): task arithmetic whose summed task vector is scaled per layer, λ(l) = α + β·l/(L−1).

As the reference's merging variant (``wang-kee/LiNeS``, ``src/eval/eval.py``: ``evaluate`` with
``apply_lines`` on the ``sum`` method): the multi-task vector is Σ τᵢ and α = ‖Σ τᵢ‖₁ / ‖merged‖₁ / T, which is
1/T for task arithmetic (the default here); β is tuned on validation data there (0.1 … 1.0). Block l of the L
blocks of its stack (``settings.Layout.depth``) gets α + β·l/(L−1); embeddings, final norm and head get α.
Every engine method takes the same scaling as a post-pass: ``--set lines=α,β``.
"""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import WEIGHTS, Param


class Lines(TaskVectorMerge):
    """LiNeS (Wang et al. 2025): task arithmetic scaled by layer depth, λ(l) = α + β·l/(L−1), α = 1/T by default."""

    elementwise = True  # λ is one number per tensor: the chunked path computes the same values

    hyperparameters = {
        "weights": WEIGHTS,
        "alpha": Param(None, "α: the factor of the first block and of tensors outside the blocks (default 1/T, the "
                             "reference's value for task arithmetic)", low=0.0, optional=True),
        "beta": Param(0.5, "β: how much more the last block gets than the first (the reference tunes it in 0.1 … 1.0)",
                      low=0.0),
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        if self.layout is None:
            raise ConfigError(f"method '{self.name}' needs the model's layer layout (method.layout)")
        alpha = 1.0 / len(task_vectors) if h["alpha"] is None else h["alpha"]
        depth = self.layout.depth(name)
        factor = ops.lines_scale(*(depth or (None, None)), alpha, h["beta"])
        return ops.task_arithmetic(task_vectors, weights=h["weights"], scale=factor)
