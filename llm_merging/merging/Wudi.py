"""``wudi``: WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors"; reference code ``nathanielyvo/WUDI-Merging``).

The weight of every dense layer (``nn.Linear``, or GPT-2's ``Conv1D`` taken as its transpose) gets the
merged task vector minimising Σᵢ ‖(τ − τᵢ)τᵢᵀ‖²/‖τᵢ‖² (:func:`llm_merging.ops.wudi`): Adam from Σ τᵢ as the
reference code (``steps``, ``lr``), or the exact minimiser (``solver=closed_form``). Every other tensor
(biases, norms, embeddings, a head tied to the embedding) gets the ``fallback``; ``solver=none`` sends a
tensor to the fallback too (per tensor with a filter, e.g. to leave ``lm_head`` out as the authors' LLM
code does). LoRA experts make the steps cheap: the A factors span the task vectors' rows.
"""
from __future__ import annotations

import logging
import time

import torch

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded
from llm_merging.merging import calibration as cal
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, Param
from llm_merging.model import is_conv1d
from llm_merging.ops.wudi import DEFAULT_LR, DEFAULT_STEPS, WUDI_FALLBACKS, WUDI_SOLVERS

logger = logging.getLogger(__name__)

STEPS = Param(DEFAULT_STEPS, "Adam steps per dense-layer weight (the reference: 300; 0: the sum of the task vectors)",
              kind=int, low=0, high=1_000_000)
LR = Param(DEFAULT_LR, "Adam learning rate (the reference: 1e-5; search it on a log scale, e.g. lr=1e-6:1e-4:log)",
           low=0.0, low_open=True)
SOLVER = Param("adam", "adam: the reference's Adam steps from the sum of the task vectors; closed_form: the exact "
                       "minimiser; none: this tensor gets the fallback", kind=str, choices=(*WUDI_SOLVERS, "none"))
FALLBACK = Param("mean", "tensors WUDI does not optimise (biases, norms, embeddings): mean of the task vectors (the "
                         "authors' LLM code), sum, or base (θ₀ kept, the reference's ViT/RoBERTa scripts)",
                 kind=str, choices=WUDI_FALLBACKS)
#: how often (in Adam steps) the time budget is asked within one tensor
BUDGET_EVERY = 8


class Wudi(TaskVectorMerge):
    """WUDI (Cheng et al. 2025): per linear layer, min Σ‖(τ−τᵢ)τᵢᵀ‖²/‖τᵢ‖² (task vectors as input proxies), data-free."""

    hyperparameters = {
        "steps": STEPS,
        "lr": LR,
        "solver": SOLVER,
        "fallback": FALLBACK,
        "scale": SCALE,
    }

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self._dense: tuple[int, dict[str, bool]] | None = None  # (id of the model, {name: stored transposed?})

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        transposed = self._dense_layer(name, base)
        if h["solver"] == "none" or transposed is None:
            return ops.wudi_fallback(task_vectors, h["fallback"], h["scale"])
        device = self.torch_device()
        tvs = [t.to(device=device, dtype=torch.float32) for t in task_vectors]
        if transposed:
            tvs = [t.T for t in tvs]
        basis = self._row_basis(name, base.shape, tvs, transposed, device)
        t0 = time.time()
        merged = ops.wudi(tvs, int(h["steps"]), float(h["lr"]), solver=h["solver"], scale=h["scale"],
                          row_basis=basis, on_step=lambda step: self._check_budget(name, step))
        if logger.isEnabledFor(logging.DEBUG):
            start = tvs[0].clone()
            for t in tvs[1:]:
                start += t
            logger.debug("%s: %s %s %s, loss %.6g (sum of task vectors) -> %.6g in %.2fs", self.name, name,
                         "x".join(map(str, tvs[0].shape)), h["solver"] if basis is None else f"{h['solver']} (LoRA basis)",
                         ops.wudi_loss(start, tvs), ops.wudi_loss(merged / h["scale"] if h["scale"] else merged, tvs),
                         time.time() - t0)
        if transposed:
            merged = merged.T
        return merged.to(base.device).contiguous()

    def _check_budget(self, name: str, step: int) -> None:
        if step % BUDGET_EVERY == BUDGET_EVERY - 1 and self.should_stop is not None and self.should_stop():
            raise BudgetExceeded(f"time budget ran out while method '{self.name}' optimised '{name}'; nothing was saved")

    def _dense_layer(self, name: str, base: torch.Tensor) -> bool | None:
        """None when ``name`` is not a dense layer's weight; else whether it is stored as (in, out) (Conv1D).
        Without a loaded model (library use), every matrix counts as an ``nn.Linear`` weight."""
        if base.dim() != 2:
            return None
        model = self.base_model
        if not isinstance(model, torch.nn.Module):
            return False
        if self._dense is None or self._dense[0] != id(model):
            names = [n for n, _ in model.named_parameters()]
            self._dense = (id(model), {n: is_conv1d(model.get_submodule(mod))
                                       for n, mod in cal.linear_weights(model, names).items()})
        return self._dense[1].get(name)

    def _row_basis(self, name: str, shape, tvs: list[torch.Tensor], transposed: bool, device) -> torch.Tensor | None:
        """Columns spanning the rows of every task vector when each comes from LoRA factors alone (the A
        factors, transposed; ``shape``: the stored weight's, factors of another shape do not count), else None.
        Only worth it when their total rank is below the input size."""
        if len(self.experts) != len(tvs):
            return None
        cols = []
        for factors, tv in zip(self.exact_factors(name, device, shape), tvs):
            if factors is None:
                if bool(torch.any(tv != 0)):
                    return None  # a full tensor, a LoRA with a full-tensor part, or re-indexed rows
                continue
            b, a = factors
            cols.append((b if transposed else a.T).to(device=device, dtype=torch.float32))
        if not cols:
            return None
        basis = torch.cat(cols, dim=1)
        return basis if basis.shape[1] < tvs[0].shape[1] else None
