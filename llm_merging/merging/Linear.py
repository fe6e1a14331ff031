"""``linear``: weighted average of the models (model soup, Wortsman et al. 2022)."""
from __future__ import annotations

import torch

from .. import ops
from ..errors import ConfigError
from .hparams import WEIGHTS, Param, per_model
from .Merges import Merges


class Linear(Merges):
    """Weighted average Σ wᵢθᵢ / Σ wᵢ of the expert models (model soup)."""

    hyperparameters = {
        "weights": WEIGHTS,
        "normalize": Param(True, "divide by the sum of the weights", kind=bool),
    }

    def __init__(self, name: str | None = "linear") -> None:
        super().__init__(name)
        # Defaults: Llama-2-7B LoRA experts from the starter kit (override with --base-model/--models).
        self.base_model_name = "meta-llama/Llama-2-7b-hf"
        self.base_model_revision_id = "01c7f73d771dfac7d292323805ebc428287df4f9"
        self.list_models = [
            ("abcdabcd987/gsm8k-llama2-7b-lora-16", "636b5eb8da724edae406ba69ef90fd06478e6df7"),
            ("FinGPT/fingpt-forecaster_dow30_llama2-7b_lora", "69f77190315afdb03a889d89bf2a0f932b311617"),
        ]
        self.max_seq_len = None
        self.max_gen_len = 64
        self.device = "auto"
        self.architecture = "decoder"
        self.loaded_models = {}
        self.loaded_configs = {}

    def validate_hyperparameters(self) -> None:
        super().validate_hyperparameters()
        if self.hparams.get("normalize") and self.list_models:
            weights = per_model(self.hparams["weights"], len(self.model_refs()))
            if abs(sum(weights)) < 1e-12:
                raise ConfigError(f"method '{self.name}': weights {weights} sum to 0; cannot normalise (set normalize=false)")

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        # θᵢ = θ₀ + τᵢ, so Σwᵢθᵢ/Σwᵢ = θ₀ + Σwᵢτᵢ/Σwᵢ: averaging the task vectors is exact.
        weights = per_model(self.hparams["weights"], len(task_vectors))
        return ops.linear(task_vectors, weights=weights, normalize=self.hparams["normalize"])
