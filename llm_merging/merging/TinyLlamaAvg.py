"""``tiny_llama_avg``: the starter kit's TinyLlama full-model average (0.8/0.2)."""
from __future__ import annotations

from dataclasses import replace

from llm_merging.merging.hparams import WEIGHTS
from llm_merging.merging.Linear import Linear


class TinyLlamaAvg(Linear):
    """Starter kit's TinyLlama v1.1 + math/code full fine-tune average (weights 0.8/0.2)."""

    hyperparameters = {
        **Linear.hyperparameters,
        "weights": replace(WEIGHTS, default=[0.8, 0.2]),
    }

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.base_model_name = "TinyLlama/TinyLlama_v1.1"
        self.base_model_revision_id = "f67f7cf6a907e567552b946699a9b9b45394fc46"
        self.list_models = [
            ("TinyLlama/TinyLlama_v1.1", "f67f7cf6a907e567552b946699a9b9b45394fc46"),
            ("TinyLlama/TinyLlama_v1.1_math_code", "36978c95f61ba8078250f04d71b5404fa9733614"),
        ]
        self.is_peft = False
