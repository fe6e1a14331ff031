"""``dare_linear``: DARE drop-and-rescale, then a weighted sum (Yu et al. 2024, "Language Models are Super Mario")."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import LINEAR_DIVISOR, SCALE, WEIGHTS, Param, consensus_kwargs
from llm_merging.ops.basic import divide_by_weight_sum
from llm_merging.ops.streaming import dare_chunks, reader_chunk


class DareLinear(TaskVectorMerge):
    """DARE (Yu et al. 2024): random drop with keep probability p, rescale by 1/p, then weighted sum."""

    consensus: str | None = None
    hyperparameters = {
        "density": Param(0.5, "probability p of keeping each entry, in (0, 1]", per_model=True, low=0.0, high=1.0,
                         low_open=True),
        "weights": WEIGHTS,
        "scale": SCALE,
        "rescale": Param("inverse", "rescale of kept entries: inverse (1/p, paper) | l1 (mergekit) | none", kind=str,
                         choices=("inverse", "l1", "none")),
        "divisor": LINEAR_DIVISOR,
    }

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        extra = consensus_kwargs(h) if self.consensus else {}
        out = ops.dare(
            task_vectors, density=h["density"], weights=h["weights"], scale=h["scale"],
            consensus=self.consensus, rescale=None if h["rescale"] == "none" else h["rescale"],
            seed=self.tensor_seed(name), **extra,
        )
        if not self.consensus and h["divisor"] == "weight_sum":
            out = divide_by_weight_sum(out, h["weights"])
        return out

    def merge_chunks(self, name: str, read, numel: int, n_models: int):
        h = self.hparams
        extra = consensus_kwargs(h) if self.consensus else {}
        if h["rescale"] != "l1" and callable(getattr(read, "single_pass", None)):
            read.single_pass()  # one pass over the inputs: nothing to keep
        chunks = dare_chunks(
            read, numel, density=h["density"], weights=h["weights"], scale=h["scale"], consensus=self.consensus,
            rescale=None if h["rescale"] == "none" else h["rescale"], seed=self.tensor_seed(name),
            n_models=n_models, chunk=reader_chunk(read), **extra,
        )
        if not self.consensus and h["divisor"] == "weight_sum":
            weights = h["weights"]
            return ((s, e, divide_by_weight_sum(m, weights)) for s, e, m in chunks)
        return chunks
