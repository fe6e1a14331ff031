"""``flan_t5_avg`` (alias ``flant5_avg``): the starter kit's Flan-T5-XL LoRA average (0.5/0.5), exact in weight space."""
from __future__ import annotations

from dataclasses import replace

from llm_merging.merging.hparams import WEIGHTS
from llm_merging.merging.Linear import Linear


class FlanT5Avg(Linear):
    """Starter kit's Flan-T5-XL LoRAHub average (weights 0.5/0.5), exact ΔW in weight space."""

    hyperparameters = {
        **Linear.hyperparameters,
        "weights": replace(WEIGHTS, default=[0.5, 0.5]),
    }

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.base_model_name = "google/flan-t5-xl"
        self.base_model_revision_id = "7d6315df2c2fb742f0f5b556879d730926ca9001"
        self.list_models = [
            ("lorahub/flan_t5_xl-wiki_qa_Is_This_True_", "30a1ee2f857196c1eb996d854548cc19f45ac642"),
            ("lorahub/flan_t5_xl-kilt_tasks_hotpotqa_complex_question", "27d014366bec1c5333ba2e2fae966b7de3c02df1"),
        ]
        self.is_peft = True
        self.max_seq_len = 512
        self.architecture = "encoder_decoder"
