"""``linear``: weighted average of the models (model soup, Wortsman et al. 2022)."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import WEIGHTS, Param


class Linear(TaskVectorMerge):
    """Weighted average Σ wᵢθᵢ / Σ wᵢ of the expert models (model soup)."""

    elementwise = True
    base_optional = True  # θ_T + Σwᵢ(θᵢ − θ_T)/Σwᵢ = Σwᵢθᵢ/Σwᵢ for any template θ_T (the first model)

    hyperparameters = {
        "weights": WEIGHTS,
        "normalize": Param(True, "divide by the sum of the weights", kind=bool),
    }

    def check_values(self, values: dict) -> None:
        if values.get("normalize") and "weights" in values and abs(sum(values["weights"])) < 1e-12:
            raise ConfigError(f"method '{self.name}': weights {values['weights']} sum to 0; cannot normalise (set normalize=false)")

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        # θᵢ = θ₀ + τᵢ, so Σwᵢθᵢ/Σwᵢ = θ₀ + Σwᵢτᵢ/Σwᵢ: averaging the task vectors is exact. Unnormalised,
        # Σwᵢθᵢ = θ₀ + Σwᵢτᵢ + (Σwᵢ − 1)·θ₀ (as mergekit's linear with normalize: false). Both hold for any
        # θ₀, so a merge without a base (θ₀ the first model, one of the averaged models) is exact too.
        w, normalize = self.hparams["weights"], self.hparams["normalize"]
        out = ops.linear(task_vectors, weights=w, normalize=normalize)
        if not normalize:
            total = float(sum(w) if isinstance(w, (list, tuple)) else w * len(task_vectors))
            if total != 1.0:
                out.add_(base.to(out.dtype), alpha=total - 1.0)
        return out
