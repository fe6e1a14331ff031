"""mergekit 0.1.5 method names and parameters in our terms, for ``--recipe`` (``llm_merging.recipe``).

Each entry maps a mergekit ``merge_method`` to one of our registered methods: mergekit parameter names to
ours (``params``), our hyperparameters fixed to mergekit's conventions (``fixed``, e.g. weighted sign
election), mergekit's defaults where ours differ (``defaults``, in mergekit names), and a final value
translation (``translate``) for parameters whose meaning differs (mergekit ``normalize`` → our divisor).
``base_as_model``: the base model is one of the inputs (it gets τ = 0 and its own weight), as in mergekit's
``linear``/``slerp``; otherwise a listed base model is the reference only, as in mergekit's task-arithmetic
family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from . import settings


@dataclass(frozen=True)
class MergekitMethod:
    name: str
    ours: str
    params: dict[str, str]
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    convert: Callable[[dict], dict] | None = None
    needs_base: bool = True
    base_as_model: bool = False

    def translate(self, values: dict) -> dict:
        return self.convert(dict(values)) if self.convert is not None else values


def _map(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every plain value of a setting (per-model lists, chains, filters, gradients)."""
    if isinstance(setting, list):
        return [_map(s, fn) for s in setting]
    if isinstance(setting, settings.Gradient):
        return settings.Gradient(tuple(fn(v) for v in setting.anchors))
    if isinstance(setting, settings.Filtered):
        return settings.Filtered(tuple((f, _map(v, fn)) for f, v in setting.entries))
    if isinstance(setting, settings.Sliced):
        return settings.Sliced(tuple(None if v is None else _map(v, fn) for v in setting.per_slice))
    if isinstance(setting, settings.Chain):
        return settings.Chain(tuple(_map(v, fn) for v in setting.levels))
    return fn(setting)


def _normalize_to_divisor(values: dict) -> dict:
    """mergekit ``normalize`` (TIES family): divide by the sum of the agreeing weights, or not at all."""
    if "divisor" in values:
        values["divisor"] = _map(values["divisor"], lambda v: "weight_sum" if v is True else ("none" if v is False else v))
    return values


_GTA = {"weight": "weights", "density": "density", "lambda": "scale"}


def _gta(name: str, ours: str, consensus: bool, normalize: bool, extra: dict | None = None,
         fixed: dict | None = None, defaults: dict | None = None) -> MergekitMethod:
    params = {**_GTA, **(extra or {})}
    d = {"density": 1.0, "lambda": 1.0, **(defaults or {})}
    f = dict(fixed or {})
    if consensus:
        params["normalize"] = "divisor"
        d["normalize"] = normalize
        f.update({"weighted_sign": True, "sign_method": "total"})
    return MergekitMethod(name, ours, params, fixed=f, defaults=d,
                          convert=_normalize_to_divisor if consensus else None)


MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod("linear", "linear", {"weight": "weights", "normalize": "normalize"},
                       defaults={"normalize": True}, base_as_model=True, needs_base=False),
        _gta("task_arithmetic", "task_arithmetic", consensus=False, normalize=False),
        _gta("ties", "ties_merge", consensus=True, normalize=True),
        _gta("dare_linear", "dare_linear", consensus=False, normalize=False, fixed={"rescale": "l1"}),
        _gta("dare_ties", "dare_ties", consensus=True, normalize=False, fixed={"rescale": "l1"}),
        _gta("breadcrumbs", "breadcrumbs", consensus=False, normalize=False, extra={"gamma": "gamma"},
             defaults={"gamma": 0.01}),
        _gta("breadcrumbs_ties", "breadcrumbs_ties", consensus=True, normalize=False, extra={"gamma": "gamma"},
             defaults={"gamma": 0.01}),
        _gta("della", "della", consensus=True, normalize=True, extra={"epsilon": "epsilon"},
             defaults={"epsilon": 0.15}),
        _gta("della_linear", "della_linear", consensus=False, normalize=False, extra={"epsilon": "epsilon"},
             defaults={"epsilon": 0.15}),
        MergekitMethod("slerp", "slerp", {"t": "t"}, fixed={"space": "weights"}, base_as_model=True),
        MergekitMethod("model_stock", "model_stock", {"filter_wise": "filter_wise"}),
    )
}
