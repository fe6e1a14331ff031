"""The search space: what a trial may change, parsed from ``--search`` entries, a recipe's
``llm_merging.search`` section or the methods' ``Param`` declarations, and checked against those
declarations before any weight is loaded.

Syntax of one entry (``--search ENTRY ...``; in a recipe, ``KEY: RANGE`` under ``llm_merging: search:``):

* ``KEY=LOW:HIGH`` a float (or int, for an int hyperparameter) range; ``KEY=LOW:HIGH:log`` sampled on a log
  scale; ``KEY=a|b|c`` a choice (strings, numbers, true/false);
* ``KEY[*]=...`` one value per expert; ``KEY[i]=...`` expert ``i`` only (0-based; the others keep their
  value); ``KEY`` alone is one value shared by every expert;
* ``KEY@G=...`` a gradient of ``G`` anchors over layer depth (per-layer-group values, as ``--set
  'KEY={gradient: [...]}'``), combinable: ``density[*]@3=0.1:1``;
* ``METHOD.KEY=...`` only for method ``METHOD`` when several methods are searched (``-m a b``); a key
  without a method applies to every searched method that declares it.

A ``KEY`` alone (no ``=``) takes its default range. With no entries, the default space of each method is
its bounded numeric hyperparameters, ``scale`` in [0.5, 2] (log) and one weight per expert in [0.1, 1],
less the keys fixed with ``--set``; entries narrow or extend that space.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from llm_merging.core.errors import ConfigError
from llm_merging.merging import settings
from llm_merging.merging.hparams import COMMON, Param

#: default ranges of hyperparameters whose declaration has no (finite) bounds, or a better usual range
DEFAULT_RANGES: dict[str, tuple[float, float, bool]] = {
    "weights": (0.1, 1.0, False),
    "scale": (0.5, 2.0, True),
    "density": (0.1, 1.0, False),
}
#: declared keys never searched by default (evaluation/output options, numerical tolerances)
NOT_SEARCHED = set(COMMON) | {"eps", "tol", "max_iter"}

_ENTRY = re.compile(r"^(?:(?P<method>[A-Za-z_][\w]*)\.)?(?P<key>[A-Za-z_]\w*)"
                    r"(?:\[(?P<index>\*|\d+)\])?(?:@(?P<anchors>\d+))?$")


@dataclass(frozen=True)
class Dim:
    """One searched hyperparameter (possibly several Optuna parameters: per expert, per anchor)."""

    key: str
    method: str | None = None  # None: every searched method that declares ``key``
    index: int | str | None = None  # None: shared; "*": one per expert; i: expert i only
    anchors: int | None = None  # a gradient of this many anchors
    kind: str = "float"  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def label(self) -> str:
        """The entry as written on the command line (normalised; without its method)."""
        head = self.key
        if self.index is not None:
            head += f"[{self.index}]"
        if self.anchors:
            head += f"@{self.anchors}"
        if self.kind == "categorical":
            return f"{head}={'|'.join(_text(c) for c in self.choices)}"
        return f"{head}={_text(self.low)}:{_text(self.high)}" + (":log" if self.log else "")


@dataclass
class SearchSpace:
    """The searched methods and their dimensions (``dims[method]``), checked against each method's Params."""

    methods: list[str]
    dims: dict[str, list[Dim]] = field(default_factory=dict)
    n_experts: int = 0

    def describe(self) -> list[str]:
        """Stable text of the space (stored in the study, compared on ``--resume``)."""
        out = [f"method={'|'.join(self.methods)}"] if len(self.methods) > 1 else []
        for m in self.methods:
            out += [f"{m}:{d.label()}" for d in self.dims[m]]
        return out

    def param_names(self, method: str, dim: Dim) -> list[tuple[str, int | None, int | None]]:
        """Optuna parameter names of ``dim`` for ``method``: ``(name, expert or None, anchor or None)``."""
        prefix = f"{method}." if len(self.methods) > 1 else ""
        experts: list[int | None] = ([None] if dim.index is None else
                                     list(range(self.n_experts)) if dim.index == "*" else [int(dim.index)])
        anchors: list[int | None] = [None] if not dim.anchors else list(range(dim.anchors))
        out = []
        for e in experts:
            for a in anchors:
                name = prefix + dim.key + ("" if e is None else f"[{e}]") + ("" if a is None else f"@{a}")
                out.append((name, e, a))
        return out

    def size(self) -> float:
        """Number of distinct candidates (inf when a dimension is continuous)."""
        total = 0.0
        for m in self.methods:
            n = 1.0
            for d in self.dims[m]:
                if d.kind == "float":
                    return math.inf
                k = len(d.choices) if d.kind == "categorical" else int(d.high - d.low + 1)
                n *= float(k) ** len(self.param_names(m, d))
            total += n
        return total


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return repr(v)
    return str(v)


def parse_entry(text: str, where: str = "--search") -> tuple[str, str | None]:
    """Split ``KEY-SPEC=RANGE`` (RANGE None when absent)."""
    head, sep, rng = text.partition("=")
    head = head.strip()
    if not head:
        raise ConfigError(f"{where} {text!r}: expected KEY=LOW:HIGH[:log], KEY=a|b|c or KEY")
    return head, (rng.strip() if sep else None)


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number (expected LOW:HIGH[:log] or a|b|c)") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: bounds must be finite, got {text!r}")
    return v


def _choice(text: str, spec: Param, where: str = "--search") -> Any:
    t = text.strip()
    if spec.kind in (bool, int, float):
        try:
            return spec._scalar("", t)
        except ConfigError:
            raise ConfigError(f"{where}: {t!r} is not a {spec.kind.__name__}") from None
    return t


def build_dim(head: str, rng: Any, specs_by_method: dict[str, dict[str, Param]], n_experts: int,
              where: str) -> list[tuple[str, Dim]]:
    """The dimension of one entry for every method it applies to, checked against the Params."""
    m = _ENTRY.match(head)
    if m is None:
        raise ConfigError(f"{where}: {head!r} is not KEY, KEY[*], KEY[i], KEY@G or METHOD.KEY")
    method, key = m.group("method"), m.group("key")
    index = m.group("index")
    index = None if index is None else ("*" if index == "*" else int(index))
    anchors = int(m.group("anchors")) if m.group("anchors") else None
    if method is not None and method not in specs_by_method:
        raise ConfigError(f"{where}: method '{method}' is not searched (-m gives {', '.join(specs_by_method)})")
    targets = [method] if method else [name for name, specs in specs_by_method.items() if key in specs]
    if not targets:
        known = sorted({k for specs in specs_by_method.values() for k in specs})
        raise ConfigError(f"{where}: unknown hyperparameter '{key}' for {', '.join(specs_by_method)} "
                          f"(known: {', '.join(known)})")
    out = []
    for name in targets:
        specs = specs_by_method[name]
        if key not in specs:
            raise ConfigError(f"{where}: unknown hyperparameter '{key}' for method '{name}' (known: {', '.join(sorted(specs))})")
        spec = specs[key]
        if index is not None and not spec.per_model:
            raise ConfigError(f"{where}: '{key}' of method '{name}' takes one value, not one per expert ([{index}])")
        if isinstance(index, int) and index >= n_experts:
            raise ConfigError(f"{where}: expert index {index} out of range (there are {n_experts} experts)")
        if anchors is not None and anchors < 1:
            raise ConfigError(f"{where}: a gradient needs at least 1 anchor, got @{anchors}")
        if anchors is not None and spec.kind is int:
            raise ConfigError(f"{where}: '{key}' is an integer: it takes no gradient")
        out.append((name, _dim(key, name if method else None, index, anchors, rng, spec, where)))
    return out


def _dim(key, method, index, anchors, rng, spec: Param, where: str) -> Dim:
    if spec.kind not in (float, int, str, bool):
        raise ConfigError(f"{where}: '{key}' ({spec.kind.__name__}) cannot be searched")
    if rng is None:  # the default range of the key
        if spec.kind is bool:
            rng = [True, False]
        elif spec.choices:
            rng = list(spec.choices)
        else:
            low, high, log = default_range(key, spec)
            if low is None:
                raise ConfigError(f"{where}: '{key}' has no default range; give one: {key}=LOW:HIGH")
            rng = f"{low}:{high}" + (":log" if log else "")
    if isinstance(rng, (list, tuple)):
        choices = [c if not isinstance(c, str) else _choice(c, spec, where) for c in rng]
    elif isinstance(rng, str) and "|" in rng:
        choices = [_choice(c, spec, where) for c in rng.split("|")]
    elif isinstance(rng, str) and ":" in rng:
        parts = rng.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip().lower() != "log"):
            raise ConfigError(f"{where}: expected LOW:HIGH or LOW:HIGH:log, got {rng!r}")
        if spec.kind not in (int, float):
            raise ConfigError(f"{where}: '{key}' is a {spec.kind.__name__}: give choices a|b|c, not a range")
        low, high = _number(parts[0], where), _number(parts[1], where)
        log = len(parts) == 3
        if not low < high:
            raise ConfigError(f"{where}: empty range {rng!r} (LOW must be below HIGH)")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range needs LOW > 0, got {rng!r}")
        if spec.kind is int and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{where}: '{key}' is an integer: give integer bounds, got {rng!r}")
        for v in (low, high):
            try:
                spec._check(key, int(v) if spec.kind is int else float(v))
            except ConfigError:
                raise ConfigError(f"{where}: range {rng} is outside the bounds of '{key}' {spec.describe()}") from None
        return Dim(key, method, index, anchors, "int" if spec.kind is int else "float", low, high, log)
    else:
        choices = [_choice(str(rng), spec, where)]
    if not choices:
        raise ConfigError(f"{where}: no choices")
    for c in choices:
        try:
            spec._check(key, c)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if len(set(map(repr, choices))) != len(choices):
        raise ConfigError(f"{where}: repeated choices in {rng!r}")
    return Dim(key, method, index, anchors, "categorical", choices=tuple(choices))


def default_range(key: str, spec: Param) -> tuple[float | None, float | None, bool]:
    """A usual range of a numeric hyperparameter: :data:`DEFAULT_RANGES`, else its declared bounds
    (open bounds moved inside by 1e-3 of the width); ``(None, None, False)`` when it has none."""
    if key in DEFAULT_RANGES:
        low, high, log = DEFAULT_RANGES[key]
    elif spec.low is not None and spec.high is not None and math.isfinite(spec.low) and math.isfinite(spec.high):
        low, high, log = float(spec.low), float(spec.high), False
    else:
        return None, None, False
    width = high - low
    if spec.low is not None and (low < spec.low or (spec.low_open and low == spec.low)):
        low = spec.low + 1e-3 * width
    if spec.high is not None and (high > spec.high or (spec.high_open and high == spec.high)):
        high = spec.high - 1e-3 * width
    return low, high, log


def default_dims(specs: dict[str, Param]) -> list[Dim]:
    """The default space of one method: bounded floats, ``scale``, one weight per expert."""
    out = []
    for key, spec in specs.items():
        if key in NOT_SEARCHED or spec.kind is not float:
            continue
        low, high, log = default_range(key, spec)
        if low is None:
            continue
        index = "*" if key == "weights" and spec.per_model else None
        out.append(Dim(key, None, index, None, "float", low, high, log))
    return out


def build_space(methods: Sequence[str], specs_by_method: dict[str, dict[str, Param]], n_experts: int,
                entries: Iterable[tuple[str, Any]], where_of=lambda head: f"--search {head}",
                fixed: dict[str, set[str]] | None = None) -> SearchSpace:
    """The space of ``methods``: their default space (less the keys in ``fixed[method]``, set with
    ``--set``) narrowed or extended by the entries (an entry replaces the default dimension of its key)."""
    fixed = fixed or {}
    space = SearchSpace(list(methods), {m: [d for d in default_dims(specs_by_method[m]) if d.key not in fixed.get(m, ())]
                                        for m in methods}, n_experts)
    for head, rng in entries:
        for method, dim in build_dim(head, rng, specs_by_method, n_experts, where_of(head)):
            kept = [d for d in space.dims[method] if d.key != dim.key or
                    (d.index is not None and dim.index is not None and d.index != dim.index and "*" not in (d.index, dim.index))]
            space.dims[method] = kept + [dim]
    if not any(space.dims[m] for m in space.methods) and len(space.methods) < 2:
        raise ConfigError(f"--search: empty search space: method {', '.join(methods)} has no searchable "
                          "hyperparameter; give ranges, e.g. --search scale=0.5:2")
    return space


def candidate_values(space: SearchSpace, method: str, params: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter settings of ``method`` for a trial's ``params``, on top of ``current`` (its fixed values)."""
    out: dict[str, Any] = {}
    for dim in space.dims[method]:
        names = space.param_names(method, dim)
        if dim.index is None:
            values = [params[n] for n, _, _ in names]
            out[dim.key] = _setting(values, dim)
            continue
        base = out.get(dim.key, current.get(dim.key))
        per = list(base) if isinstance(base, (list, tuple)) else [base] * space.n_experts
        by_expert: dict[int, list] = {}
        for n, e, _ in names:
            by_expert.setdefault(e, []).append(params[n])
        for e, values in by_expert.items():
            per[e] = _setting(values, dim)
        out[dim.key] = per
    return out


def _setting(values: list, dim: Dim) -> Any:
    if dim.anchors:
        return settings.Gradient(tuple(values))
    return values[0]
