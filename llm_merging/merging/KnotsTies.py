"""``knots_ties``: KnOTS (Stoica et al. 2025): align LoRA updates in a shared SVD basis, then TIES-merge them."""
from __future__ import annotations

import torch

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import (
    CONSENSUS,
    DENSITY,
    SCALE,
    WEIGHTS,
    Param,
    consensus_kwargs,
)


class KnotsTies(TaskVectorMerge):
    """KnOTS (Stoica et al. 2025): shared SVD basis of the LoRA updates, then TIES (or task arithmetic)."""

    hyperparameters = {
        "density": DENSITY,
        "weights": WEIGHTS,
        "scale": SCALE,
        "merge": Param("ties", "merge of the aligned factors: ties | task_arithmetic", kind=str, choices=("ties", "task_arithmetic")),
        **CONSENSUS,
    }

    def preflight(self) -> dict:
        found = super().preflight()
        full = [e["id"] for e in found["experts"] if e["kind"] != "lora"]
        if full:
            raise ConfigError(f"method '{self.name}' merges LoRA adapters only; '{full[0]}' is a full model")
        return found

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        factors, weights, densities = [], h["weights"], h["density"]
        keep = []
        for i, (expert, tv) in enumerate(zip(self.experts, task_vectors)):
            f = expert.factors(name)
            if f is None:
                if torch.count_nonzero(tv):
                    raise ConfigError(f"knots_ties needs LoRA experts: '{expert.name}' changes '{name}' without LoRA factors")
                continue
            b, a = f
            factors.append((b.to(base.device, torch.float32), a.to(base.device, torch.float32)))
            keep.append(i)
        if not factors:
            return torch.zeros_like(base)
        return ops.knots(
            factors, method=h["merge"], density=[densities[i] for i in keep], weights=[weights[i] for i in keep],
            scale=h["scale"], **consensus_kwargs(h),
        )
