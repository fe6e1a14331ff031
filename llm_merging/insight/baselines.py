"""Baselines: the base model and each expert alone, evaluated on the run's files, in the loaded model.

No reload: the loaded (merged) model's parameters are overwritten tensor by tensor — θ₀ read from the base
checkpoint for the base; θ₀ + s·B·A for a LoRA expert (what PEFT's ``merge_and_unload`` computes); the
stored tensor for a full fine-tune (streamed from its safetensors like the merge) — evaluated with the
run's own evaluation, then put back to θ₀ before the next expert. Memory: one tensor at a time beyond the
model. Afterwards the in-memory model holds the base weights; the merged model was saved and evaluated
before.

The normalised score (as merging papers report it): the merged model's score on a dataset as a share of
the best single expert's score on that dataset (each expert's own task, when every dataset has its
expert); computed for every metric, and averaged over the datasets for the main metric.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch

from llm_merging.core.errors import BudgetExceeded, CheckpointError
from llm_merging.core.io import jsonable
from llm_merging.evaluation import evaluate_model, primary_score
from llm_merging.insight.analysis import short_names
from llm_merging.model.engine import base_param_shapes, compute_device, open_base_reader

logger = logging.getLogger(__name__)

NORMALISED_RULE = ("normalised score = merged score / the best single expert's score on the same dataset "
                   "(per metric; 'score' is the main metric: accuracy, rougeL, or their mean)")


class _Named:
    """The run's method under another name, so evaluation writes its outputs in a folder of their own."""

    def __init__(self, method, name: str) -> None:
        self.__dict__["_method"] = method
        self.__dict__["name"] = name

    def get_name(self) -> str:
        return self.__dict__["name"]

    def __getattr__(self, key: str) -> Any:
        return getattr(self.__dict__["_method"], key)

    def __setattr__(self, key: str, value: Any) -> None:
        setattr(self.__dict__["_method"], key, value)


def _label(i: int, name: str) -> str:
    return f"expert{i}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", short_names([name])[0])[:60]


class ModelSwapper:
    """Overwrite the parameters of a loaded model with the base's or one expert's, tensor by tensor."""

    def __init__(self, method) -> None:
        self.model = method.base_model
        self.params = dict(self.model.named_parameters())
        self.experts = method.open_experts(base_param_shapes(self.model))
        self.reader = open_base_reader(method.base_ref().local_path, self.model)
        if self.reader is None:
            raise CheckpointError(f"--baselines: the base checkpoint in {method.base_ref().local_path} cannot serve "
                                  f"its tensors one at a time (or its vocabulary differs from the loaded model)")
        self.touched = sorted({n for e in self.experts for n in e.param_names()} & set(self.params))

    def _write(self, name: str, value: torch.Tensor) -> None:
        p = self.params[name]
        if p.device.type == "cpu":  # fresh storage: never write into the memory-mapped checkpoint pages
            p.data = value.to(device=p.device, dtype=p.dtype)
        else:
            p.data.copy_(value.to(dtype=p.dtype))

    def _base(self, name: str) -> torch.Tensor:
        p = self.params[name]
        return self.reader.tensor(name, p).to(device=compute_device(p))

    @torch.no_grad()
    def restore(self, names=None, progress: bool = False) -> None:
        """θ₀ into ``names`` (default: every tensor an expert touches)."""
        from tqdm.auto import tqdm

        for name in tqdm(self.touched if names is None else names, desc="restore base", unit="tensor",
                         disable=not progress, leave=False):
            self._write(name, self._base(name))

    @torch.no_grad()
    def apply(self, index: int, progress: bool = False) -> list[str]:
        """Expert ``index`` alone into the model (from θ₀); return the tensors written."""
        from tqdm.auto import tqdm

        expert = self.experts[index]
        names = sorted(set(expert.param_names()) & set(self.params))
        for name in tqdm(names, desc=f"apply {getattr(expert, 'name', index)}", unit="tensor", disable=not progress,
                         leave=False):
            base = self._base(name)
            full = getattr(expert, "tensor", None)
            value = full(name, base) if full is not None else None
            if value is None:
                tv = expert.delta(name, base)
                value = base if tv is None else base.add_(tv.to(device=base.device, dtype=torch.float32))
            self._write(name, value)
        return names

    def close(self) -> None:
        for e in self.experts:
            close = getattr(e, "close", None)
            if close is not None:
                close()


def run_baselines(ctx, evaluate: Callable | None = None) -> dict[str, Any]:
    """Evaluate the base and each expert alone on the run's files (outputs under ``OUT/METHOD/baselines/``);
    return the ``baselines`` section of report.json. Raises BudgetExceeded when the budget stops it
    (what finished is kept in the report)."""

    method, cfg = ctx.method, ctx.config
    evaluate = evaluate or evaluate_model
    out_root = ctx.out_dir / "baselines"
    section: dict[str, Any] = {"rule": NORMALISED_RULE, "models": [], "partial": False}
    ctx.report["baselines"] = section
    swapper = ModelSwapper(method)
    refs = ctx.report.get("models", {}).get("experts", [])
    todo = [("base", None, "base", ctx.report.get("models", {}).get("base", {}).get("id"))]
    for i, e in enumerate(swapper.experts):
        kind = e.kind
        ref = refs[i]["id"] if i < len(refs) else getattr(e, "name", str(i))
        todo.append((_label(i, getattr(e, "name", str(i))), i, kind, ref))
    try:
        swapper.restore(progress=cfg.progress)
        for label, index, kind, ref in todo:
            if ctx.budget.expired():
                section["partial"] = True
                raise BudgetExceeded(f"time budget of {cfg.time_budget:g} s ran out before the baseline '{label}'")
            entry: dict[str, Any] = {"label": label, "kind": kind, "ref": ref}
            if kind == "base" and index is not None:  # the base listed among the models: same as 'base'
                entry["same_as"] = "base"
                section["models"].append(entry)
                continue
            written = swapper.apply(index, progress=cfg.progress) if index is not None else []
            try:
                with ctx.budget.phase(f"baseline:{label}"):
                    result = evaluate(_Named(method, label), ctx.datasets, str(out_root), eval_types=cfg.eval_types,
                                      batch_size=cfg.batch_size, max_examples=cfg.max_examples, budget=ctx.budget,
                                      progress=cfg.progress, examples=ctx.examples)
            finally:
                if written:
                    swapper.restore(written)
            data = jsonable(result.to_dict())
            entry.update({"scores": {d["name"]: d["scores"] for d in data["datasets"]}, "average": data["average"],
                          "predictions": {d["name"]: d["predictions_path"] for d in data["datasets"]},
                          "partial": data["partial"]})
            section["models"].append(entry)
            if data["partial"]:
                section["partial"] = True
                raise BudgetExceeded(f"time budget of {cfg.time_budget:g} s ran out during the baseline '{label}'; "
                                     f"finished predictions were saved")
    finally:
        swapper.close()
        section.update(normalised_scores(ctx.report))
    return section


def normalised_scores(report: dict) -> dict[str, Any]:
    """Merged scores as a share of the best expert's, per dataset and metric, from a report's
    ``evaluation`` and ``baselines`` sections; also the gain over the base."""

    merged = {d["name"]: dict(d.get("scores") or {}) for d in report.get("evaluation", {}).get("datasets", [])}
    models = [m for m in report.get("baselines", {}).get("models", []) if "scores" in m]
    experts = [m for m in models if m["kind"] != "base"]
    base = next((m for m in models if m["kind"] == "base"), None)
    normalised: dict[str, dict[str, float | None]] = {}
    best_expert: dict[str, dict[str, Any]] = {}
    over_base: dict[str, dict[str, float | None]] = {}
    for ds, scores in merged.items():
        if not scores:
            continue
        scores = {**scores, "score": primary_score(scores)}
        normalised[ds], best_expert[ds], over_base[ds] = {}, {}, {}
        for metric, value in scores.items():
            if value is None:
                continue
            cands = []
            for m in experts:
                s = dict(m["scores"].get(ds) or {})
                if s:
                    s["score"] = primary_score(s)
                if s.get(metric) is not None:
                    cands.append((s[metric], m["label"]))
            if cands:
                top, who = max(cands)
                normalised[ds][metric] = (value / top) if top > 0 else None
                best_expert[ds][metric] = {"label": who, "value": top}
            if base is not None:
                b = dict(base["scores"].get(ds) or {})
                if b:
                    b["score"] = primary_score(b)
                if b.get(metric) is not None:
                    over_base[ds][metric] = value - b[metric]
    mains = [v["score"] for v in normalised.values() if v.get("score") is not None]
    return {"normalised": normalised, "best_expert": best_expert, "gain_over_base": over_base,
            "average_normalised": (sum(mains) / len(mains)) if mains else None}


def dataset_rows(report: dict) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """``({dataset: {model label: main score}}, labels)`` for the scores plot: merged, base, experts."""

    rows: dict[str, dict[str, float | None]] = {}
    for d in report.get("evaluation", {}).get("datasets", []):
        if d.get("scores"):
            rows.setdefault(d["name"], {})["merged"] = primary_score(d["scores"])
    for m in report.get("baselines", {}).get("models", []):
        for ds, s in (m.get("scores") or {}).items():
            if s and ds in rows:
                rows[ds][m["label"]] = primary_score(s)
    labels = []
    for values in rows.values():
        for k in values:
            if k not in labels:
                labels.append(k)
    return rows, labels


def relative_predictions(report: dict, out_dir: Path) -> list[tuple[str, str, str]]:
    """``(model, dataset, path relative to out_dir)`` of every predictions file of the run."""
    out = []

    def rel(p):
        try:
            return str(Path(p).resolve().relative_to(Path(out_dir).resolve()))
        except ValueError:
            return str(p)

    for d in report.get("evaluation", {}).get("datasets", []):
        if d.get("predictions_path"):
            out.append(("merged", d["name"], rel(d["predictions_path"])))
    for m in report.get("baselines", {}).get("models", []):
        for ds, p in (m.get("predictions") or {}).items():
            if p:
                out.append((m["label"], ds, rel(p)))
    return out
