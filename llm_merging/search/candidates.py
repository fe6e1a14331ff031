"""In-memory candidates: the base model stays loaded, θ₀ of every parameter an expert touches and the
experts' LoRA factors (or full task vectors, when they fit) are cached on the device; a candidate is
merged in place from θ₀ through the method's ``merge_resolved`` (the values the engine would write, bit for
bit), evaluated on the search data without writing a file, and undone.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from llm_merging.core.errors import MergeError
from llm_merging.core.resources import available_bytes
from llm_merging.evaluation import evaluate_dataset, primary_score, score_rows
from llm_merging.merging import settings
from llm_merging.model.engine import (base_param_shapes, compute_device, merge_in_parts, merge_parts, open_base_reader,
                                      tensor_aliases)
from llm_merging.model.lora import LoraAdapter

logger = logging.getLogger(__name__)


class CachedFull:
    """A full fine-tune's task vectors held on the device (``delta`` returns a fresh copy, as reading does)."""

    kind = "full"

    def __init__(self, expert, deltas: dict[str, torch.Tensor]) -> None:
        self.expert = expert
        self.name = expert.name
        self.deltas = deltas

    def param_names(self) -> set[str]:
        return set(self.deltas)

    def delta(self, param_name: str, base: torch.Tensor) -> torch.Tensor | None:
        d = self.deltas.get(param_name)
        return None if d is None else d.clone()

    def __getattr__(self, item: str) -> Any:  # everything else from the expert itself
        return getattr(self.expert, item)



class InMemoryMerger:
    """Load the base of ``method`` once and merge candidates into it in place.

    ``memory_fraction``: share of the free device memory (RAM on CPU) the cached full task vectors may
    take; experts beyond it are streamed from their files for every candidate.
    """

    def __init__(self, method, *, memory_fraction: float = 0.4, progress: bool = True) -> None:
        t0 = time.time()
        method._load_base_model()
        method._load_tokenizer()
        self.model = method.base_model
        self.method = method
        experts = method.open_experts(base_param_shapes(self.model))
        touched: set[str] = set()
        for e in experts:
            touched |= set(e.param_names())
        self.names = [n for n, _ in self.model.named_parameters()]
        # fused mixture-of-experts tensors merge one expert matrix at a time, as in the final merge (data-aware
        # methods keep per-parameter statistics and merge them whole there too)
        self.parts = merge_parts(self.model) if not method.needs_calibration else {}
        method.layout = settings.Layout(self.names, method.slice_lengths, tensor_aliases(self.model))
        self.params = [(n, p) for n, p in self.model.named_parameters() if n in touched]
        if not self.params:
            raise MergeError(f"method '{method.name}': the experts change no parameter of the base model")
        reader = open_base_reader(method.base_ref().local_path, self.model)
        self.theta0: dict[str, torch.Tensor] = {}
        self.device = compute_device(self.params[0][1])
        from tqdm.auto import tqdm

        with torch.no_grad():
            for name, param in tqdm(self.params, desc="search: cache θ₀", unit="tensor", disable=not progress,
                                    leave=False):
                device = compute_device(param)
                if reader is not None and name in reader.mapping:
                    self.theta0[name] = reader.tensor(name, param).to(device=device)
                else:
                    self.theta0[name] = param.detach().to(device=device, dtype=torch.float32, copy=True)
                if param.device.type == "cpu":  # own storage: never write into memory-mapped checkpoint pages
                    param.data = param.data.clone()
        if reader is not None:
            reader.close()
        self.cache_kinds: list[str] = []
        budget = available_bytes(self.device) * memory_fraction
        cached: list = []
        for e in experts:
            if isinstance(e, LoraAdapter):
                cached.append(e.in_memory(self.device))
                self.cache_kinds.append("lora factors")
                e.close()
                continue
            if getattr(e, "kind", None) == "base" or not hasattr(e, "reader"):
                cached.append(e)
                self.cache_kinds.append("none")
                continue
            need = sum(self.theta0[n].numel() * 4 for n in e.param_names() if n in self.theta0)
            if need <= budget:
                with torch.no_grad():
                    deltas = {}
                    for n in e.param_names():
                        if n in self.theta0:
                            d = e.delta(n, self.theta0[n])
                            if d is not None:
                                deltas[n] = d.to(device=self.theta0[n].device, dtype=torch.float32)
                cached.append(CachedFull(e, deltas))
                self.cache_kinds.append("task vectors")
                budget -= need
            else:
                cached.append(e)
                self.cache_kinds.append("streamed")
                logger.info("expert %s: task vectors do not fit in memory; streamed for every candidate", e.name)
        self.experts = cached
        self.setup_seconds = time.time() - t0
        self.values = sum(t.numel() for t in self.theta0.values())
        logger.info("search: base and %d experts cached (%s) in %.1f s; %d tensors, %.1fM values per candidate",
                    len(cached), ", ".join(self.cache_kinds), self.setup_seconds, len(self.params), self.values / 1e6)

    def share_with(self, method) -> None:
        """Give ``method`` the loaded model, tokenizers and experts (so it can merge and evaluate here)."""
        src = self.method
        for attr in ("base_model", "tokenizer", "input_tokenizer", "target_tokenizer", "architecture"):
            setattr(method, attr, getattr(src, attr))  # all declared by Merges.__init__
        method.merged_model = self.model
        method.experts = self.experts

    @torch.no_grad()
    def apply(self, merge_tensor: Callable[[str, torch.Tensor, list], torch.Tensor]) -> float:
        """Write θ₀ + ``merge_tensor(name, θ₀, τs)`` into every touched parameter; return the seconds."""
        t0 = time.time()
        for name, param in self.params:
            theta0 = self.theta0[name]
            base = theta0.clone()  # a method may work in place on its inputs, as it may in the engine
            tvs = []
            for e in self.experts:
                tv = e.delta(name, base)
                tvs.append(torch.zeros_like(base) if tv is None else tv.to(device=base.device, dtype=torch.float32))
            merged = merge_in_parts(merge_tensor, name, base, tvs, self.parts.get(name))
            if merged.shape != base.shape:
                raise MergeError(f"merge of parameter '{name}' returned shape {tuple(merged.shape)}, expected {tuple(base.shape)}")
            result = theta0 + merged
            if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
                raise MergeError(f"merge produced NaN or Inf in parameter '{name}'")
            param.data.copy_(result.to(device=param.device, dtype=param.dtype))
            del base, tvs, merged, result
        return time.time() - t0

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the candidate: θ₀ back into every touched parameter."""
        for name, param in self.params:
            param.data.copy_(self.theta0[name].to(device=param.device, dtype=param.dtype))

    def release(self) -> None:
        """Free the model and the caches (before the final merge loads its own copy)."""
        for e in self.experts:
            close = getattr(e, "close", None)
            if close is not None:
                close()
        self.theta0.clear()
        self.experts = []
        self.params = []
        self.method.base_model = None
        self.method.merged_model = None
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Remaining:
    """A budget view for evaluate_dataset: the seconds left before the reserve."""

    def __init__(self, fn: Callable[[], float]) -> None:
        self.remaining = fn


@dataclass
class Fitness:
    """The objective: mean over the search files of each file's primary metric (accuracy; ROUGE-L for
    generation), or with ``baselines`` of its ratio to the best single expert's score on that file.

    ``first`` rows of each file form the first slice, scored alone for the pruner."""

    names: list[str]
    rows: list[list[dict]]
    first: list[int]
    batch_size: int | None = None
    baselines: list[float] | None = None
    seconds_per_example: dict[str, float] = field(default_factory=dict)

    def _value(self, primaries: Sequence[float | None]) -> float:
        vals = []
        for i, p in enumerate(primaries):
            if p is None:
                continue
            if self.baselines is not None and self.baselines[i] and self.baselines[i] > 0:
                p = p / self.baselines[i]
            vals.append(p)
        return sum(vals) / len(vals) if vals else float("nan")

    def evaluate(self, method, remaining: Callable[[], float] | None = None,
                 report: Callable[[float], bool] | None = None) -> dict[str, Any]:
        """Score ``method``'s current model. ``report(first-slice value)`` returns True to stop (pruned).
        Returns ``{"value", "scores": {file: {metric: v}}, "primary": {file: v}, "pruned", "partial"}``."""
        budget = _Remaining(remaining) if remaining is not None else None
        preds: list[dict[int, dict]] = [dict() for _ in self.rows]
        slices = [[(0, k) for k in self.first]]
        if any(k < len(r) for k, r in zip(self.first, self.rows)):
            slices.append([(k, len(r)) for k, r in zip(self.first, self.rows)])
        pruned = partial = False
        for s, bounds in enumerate(slices):
            for f, (lo, hi) in enumerate(bounds):
                if hi <= lo:
                    continue
                rows = self.rows[f][lo:hi]
                t0 = time.perf_counter()
                got, cut, _ = evaluate_dataset(method, rows, batch_size=self.batch_size, budget=budget,
                                               progress=False, desc=self.names[f])
                self._pace(rows, len(got), time.perf_counter() - t0)
                preds[f].update({lo + i: p for i, p in got.items()})
                if cut:
                    partial = True
                    break
            if partial:
                break
            if s == 0 and len(slices) > 1 and report is not None:
                first_scores = [primary_score(score_rows(self.rows[f][:k], preds[f])[0]) for f, k in enumerate(self.first)]
                if report(self._value(first_scores)):
                    pruned = True
                    break
        scores = [score_rows(self.rows[f], preds[f])[0] for f in range(len(self.rows))]
        primary = [primary_score(s) for s in scores]
        return {"value": self._value(primary), "scores": dict(zip(self.names, scores)),
                "primary": dict(zip(self.names, primary)), "pruned": pruned, "partial": partial}

    def _pace(self, rows: Sequence[dict], n: int, seconds: float) -> None:
        if n == 0:
            return
        kinds = {r["eval_type"] for r in rows}
        per = seconds / n
        for k in kinds:  # running estimate of seconds per example, by eval type
            old = self.seconds_per_example.get(k)
            self.seconds_per_example[k] = per if old is None else 0.7 * old + 0.3 * per
