"""``TaskVectorMerge``: the base class of the built-in methods (and the easiest one to extend).

A method declares ``hyperparameters`` and implements ``merge_tensor(name, base, task_vectors)``; the engine
streams the parameters and, for each tensor, hands it ``self.hparams`` resolved to plain values (gradients,
filters and recipe precedence applied; per-model entries as one value per model). ::

    class MyMerge(TaskVectorMerge):
        \"\"\"Half of the mean task vector.\"\"\"
        hyperparameters = {"weights": WEIGHTS}

        def merge_tensor(self, name, base, task_vectors):
            return 0.5 * ops.linear(task_vectors, weights=self.hparams["weights"])
"""
from __future__ import annotations

import re
import zlib
from typing import ClassVar

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.merging.Merges import Merges
from llm_merging.ops.streaming import elementwise_chunks, reader_chunk

# Defaults when no models are given: the starter kit's Llama-2-7B LoRA experts.
DEFAULT_BASE = ("meta-llama/Llama-2-7b-hf", "01c7f73d771dfac7d292323805ebc428287df4f9")
DEFAULT_EXPERTS = [
    ("abcdabcd987/gsm8k-llama2-7b-lora-16", "636b5eb8da724edae406ba69ef90fd06478e6df7"),
    ("FinGPT/fingpt-forecaster_dow30_llama2-7b_lora", "69f77190315afdb03a889d89bf2a0f932b311617"),
]


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed, stable across runs, processes and devices."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def method_name(cls: type) -> str:
    """The registered name a class gets by default: ``TiesMerge`` → ``ties_merge``, ``FlanT5Avg`` → ``flan_t5_avg``."""
    return "_".join(part.lower() for part in re.findall(r"[A-Z][a-z]*\d*|\d+", cls.__name__))


class TaskVectorMerge(Merges):
    """Base of engine methods: default models and settings; ``merge_tensor`` sees resolved values."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name or method_name(type(self)))
        self.base_model_name, self.base_model_revision_id = DEFAULT_BASE
        self.list_models = list(DEFAULT_EXPERTS)
        self.max_seq_len = None
        self.max_gen_len = 64
        self.device = "auto"
        self.architecture = "decoder"
        self.loaded_models = {}
        self.loaded_configs = {}

    def validate_hyperparameters(self) -> None:
        super().validate_hyperparameters()
        low, high = self.expert_count
        n = len(self.model_refs())
        if self.list_models is not None and (n < low or (high is not None and n > high)):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ConfigError(f"method '{self.name}' takes {want} expert model(s) besides the base, got {n}")

    #: ``merge_tensor`` is elementwise: entry j of its result depends only on entry j of ``base`` and of the
    #: task vectors (and on the resolved values), and it modifies neither, so the engine may call it on
    #: chunks of a tensor
    elementwise: ClassVar[bool] = False

    def merge_chunks(self, name: str, read, numel: int, n_models: int):
        """For ``elementwise`` methods, ``merge_tensor`` on consecutive chunks (bit for bit the same)."""
        if not self.elementwise:
            return None
        if callable(getattr(read, "single_pass", None)):
            read.single_pass()  # one read per range: nothing to keep
        return elementwise_chunks(read, numel, lambda base, tvs: self.merge_tensor(name, base, tvs),
                                  chunk=reader_chunk(read))

    merge_chunks.elementwise_form = True

    def exact_factors(self, name: str, device, shape) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per expert of ``self.experts``: its LoRA factors ``(B·s, A)`` of parameter ``name`` on ``device`` when its
        task vector there is exactly their product, of ``shape`` (the base tensor's); else None for it (a full
        expert, a parameter the adapter does not touch or also saves whole, factors of another shape, e.g. rows
        re-indexed to an output vocabulary). Methods take an SVD or a row basis from them instead of the dense ΔW."""
        out = []
        for expert in self.experts:
            pair = expert.factors(name, device) if expert.kind == "lora" and expert.low_rank_only(name) else None
            if pair is not None and (pair[0].shape[0], pair[1].shape[1]) != tuple(shape):
                pair = None
            out.append(pair)
        return out

    def tensor_seed(self, name: str) -> int:
        """The seed of random methods for parameter ``name`` (from ``--seed``)."""
        return param_seed(self.seed, name)
