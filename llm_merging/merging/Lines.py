"""``lines``: LiNeS merging (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and
Enhances Model Merging"): task arithmetic whose summed task vector is scaled per layer, λ(l) = α + β·l/(L−1).

As the reference's merging variant (``wang-kee/LiNeS``, ``src/eval/eval.py``: ``evaluate`` with
``apply_lines`` on the ``sum`` method): the multi-task vector is Σ τᵢ and α = ‖Σ τᵢ‖₁ / ‖merged‖₁ / T, which is
1/T for task arithmetic (the default here); β is tuned on validation data there (0.1 … 1.0). Block l of the L
blocks of its stack (``settings.Layout.depth``) gets α + β·l/(L−1); embeddings, final norm and head get α.

This method *is* the LiNeS post-pass that every other engine method takes as ``--set lines=α,β``
(``Merges.lines_factor``, the one implementation of λ(l)), on task arithmetic and switched on by default: its
``merge_tensor`` returns Σ wᵢτᵢ and the post-pass scales it once, with α and β from ``alpha`` and ``beta``.
``--set lines=`` is refused here (it would scale a second time): set ``alpha`` and ``beta``.
"""
from __future__ import annotations

import torch

from llm_merging import ops
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
    builtin_modifiers = {"lines": "alpha and beta"}

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """Σ wᵢτᵢ; the LiNeS post-pass (:meth:`lines_coefficients`) scales it by λ(l)."""
        return ops.task_arithmetic(task_vectors, weights=self.hparams["weights"])

    def lines_coefficients(self, n_models: int) -> tuple[float, float]:
        """Always on: (α, β) from ``alpha`` (None: 1/T) and ``beta``."""
        h = self.hparams
        return (1.0 / n_models if h["alpha"] is None else h["alpha"]), h["beta"]
