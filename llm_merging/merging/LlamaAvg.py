"""``llama_avg``: the starter kit's Llama-2-7B LoRA average (0.8/0.2), computed exactly in weight space."""
from __future__ import annotations

from dataclasses import replace

from llm_merging.merging.hparams import WEIGHTS
from llm_merging.merging.Linear import Linear


class LlamaAvg(Linear):
    """Starter kit's Llama-2-7B LoRA average (weights 0.8/0.2), exact ΔW = s·B·A in weight space."""

    hyperparameters = {
        **Linear.hyperparameters,
        "weights": replace(WEIGHTS, default=[0.8, 0.2]),
    }

