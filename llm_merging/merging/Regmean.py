"""``regmean``: RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For each dense layer an expert changes, W = (Σᵢ wᵢ Wᵢ G'ᵢ)(Σᵢ wᵢ G'ᵢ)⁻¹ (torch layout, W is (out, in)) with
Gᵢ = XᵢᵀXᵢ the Gram matrix of the layer's inputs in expert i's own forward pass over its calibration
prompts, G'ᵢ its off-diagonal entries scaled by ``alpha``; the merged task vector is then scaled by
``scale`` (1: the paper). Other parameters (embeddings, norms, biases) go through the ``fallback``.

Statistics are gathered group by group of consecutive layers (as many as ``statistics_memory`` bytes of
float32 Gram matrices for all experts allow): per group, one pass of every expert over its prompts, each
stopped right after the group's last layer. One group (the usual case for LoRA experts) is gathered once and
reused by every ``--search`` candidate; several groups cost more forward passes but less memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError
from llm_merging.merging import calibration as cal
from llm_merging.merging.data_aware import DataAwareMerge
from llm_merging.merging.hparams import Param
from llm_merging.merging.settings import layer_index
from llm_merging.model import is_conv1d
from llm_merging.model.scoring import model_device

logger = logging.getLogger(__name__)

ALPHA = Param(0.9, "scale of the Gram matrices' off-diagonal entries: 1 exact least squares, 0 per-input-dimension "
                   "weighted average (the paper's default 0.9)", low=0.0, high=1.0)
STATISTICS_FRACTION = 0.3  # of the free memory where the activations are, for the Gram matrices of a group


@dataclass
class _Group:
    names: list[str]  # covered parameters, in model order
    units: set = field(default_factory=set)  # their layers (prefix, index), or ("", name) outside layers
    nbytes: int = 0


def _unit(name: str):
    found = layer_index(name)
    return found if found is not None else ("", name)


class Regmean(DataAwareMerge):
    """RegMean (Jin et al. 2023): per dense layer, the least-squares fit to every expert's outputs on calibration inputs."""

    hyperparameters = {"alpha": ALPHA, **DataAwareMerge.hyperparameters}
    #: regmean_plus: each layer's inputs come from the partially merged model (merged in order)
    sequential: ClassVar[bool] = False

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.statistics_memory: int | None = None  # bytes for a group's Gram matrices (None: a share of free memory)
        self._linear: dict[str, str] = {}
        self._groups: list[_Group] = []
        self._group_of: dict[str, int] = {}
        self._stats: tuple[int, list[dict[str, torch.Tensor]]] | None = None
        self.groups_gathered = 0

    def check_values(self, values: dict) -> None:
        w = values.get("weights")
        if isinstance(w, list) and (any(x < 0 for x in w) or sum(w) <= 0):
            raise ConfigError(f"method '{self.name}': weights {w} must be non-negative with a positive sum")

    # ------------------------------------------------------------------ planning
    def model_changed(self) -> None:
        self._stats = None

    def release_statistics(self) -> None:
        self._stats = None

    def begin_pass(self) -> None:
        model = self.base_model
        self._linear = cal.linear_weights(model, self._pass_names)
        modules = dict(model.named_modules())
        n = max(len(self.experts), 1)
        cost: dict[Any, int] = {}
        for pname, mname in self._linear.items():
            m = modules[mname]
            n_in = m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1]
            cost[_unit(pname)] = cost.get(_unit(pname), 0) + n_in * n_in * 4 * n
        budget = self._statistics_budget()
        groups: list[_Group] = []
        for pname in self._linear:  # model order
            u = _unit(pname)
            g = groups[-1] if groups else None
            if g is None or (u not in g.units and (self.sequential or g.nbytes + cost[u] > budget)):
                g = _Group([])
                groups.append(g)
            if u not in g.units:
                g.units.add(u)
                g.nbytes += cost[u]
            g.names.append(pname)
        plan = [g.names for g in groups]
        if self.sequential or plan != [g.names for g in self._groups]:
            self._stats = None  # statistics of the merged model (regmean_plus), or another plan
        self._groups = groups
        self._group_of = {p: i for i, g in enumerate(groups) for p in g.names}
        if len(groups) > 1 and not self.sequential:
            logger.info("%s: Gram matrices gathered in %d groups of layers (%.0f MiB allowed per group)",
                        self.name, len(groups), budget / 2**20)

    def _statistics_budget(self) -> float:
        if self.statistics_memory is not None:
            return float(self.statistics_memory)
        device = model_device(self.base_model)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            import psutil

            free = psutil.virtual_memory().available
        return STATISTICS_FRACTION * free

    # ------------------------------------------------------------------ statistics
    def _scope(self, group: _Group) -> list[str]:
        """Parameters that must hold expert i's values while its inputs to ``group`` are gathered."""
        if self.sequential:  # layers before are the merged model's; the group's own layers are expert i's
            return [n for n in self._pass_names if _unit(n) in group.units]
        last = max(self._pass_names.index(n) for n in group.names)
        return [n for k, n in enumerate(self._pass_names) if k <= last or _unit(n) in group.units]

    def _gather(self, gid: int) -> list[dict[str, torch.Tensor]]:
        group = self._groups[gid]
        modules = list(dict.fromkeys(self._linear[p] for p in group.names))
        scope = self._scope(group)
        per_expert = []
        self._stats = None  # the previous group's matrices go first
        with self.meter.timing():
            for i in range(len(self.experts)):
                with self.expert_forward(i, scope), cal.InputGrams(self.base_model, modules) as col:
                    for batch in self.calibration_batches(i):
                        if self.should_stop is not None and self.should_stop():
                            raise BudgetExceeded(f"time budget ran out while method '{self.name}' gathered its "
                                                 "input statistics; nothing was saved")
                        cal.run_forward(self.base_model, batch, col)
                        self.meter.forward_passes += 1
                self.meter.tokens += col.tokens
                per_expert.append(col.grams)
                held = sum(sum(g.numel() * 4 for n, g in e.items() if n not in col.alias) for e in per_expert)
                self.meter.statistics_bytes = max(self.meter.statistics_bytes, held)
        self.groups_gathered += 1
        return per_expert

    def _grams(self, name: str) -> list[torch.Tensor]:
        gid = self._group_of[name]
        if self._stats is None or self._stats[0] != gid:
            self._stats = (gid, self._gather(gid))
        module = self._linear[name]
        return [g[module] for g in self._stats[1]]

    # ------------------------------------------------------------------ merge
    def covers(self, name: str) -> bool:
        return name in self._linear

    def merge_covered(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        module = self.base_model.get_submodule(self._linear[name])
        grams = self._grams(name)
        out = ops.regmean(task_vectors, grams, alpha=h["alpha"], weights=h["weights"],
                          transposed=is_conv1d(module))
        group = self._groups[self._group_of[name]]
        if name == group.names[-1] and (self.sequential or len(self._groups) > 1):
            self._stats = None  # this group is done: free its matrices before the next one is gathered
        return out.mul_(float(h["scale"]))
