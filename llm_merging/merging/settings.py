"""Per-tensor hyperparameter settings: how one value in a recipe (or ``--set``) becomes the plain number a
method sees for one tensor.

A *setting* is one of (mergekit 0.1.5, ``mergekit/config.py`` ``evaluate_setting`` and
``parameter_resolver.py``):

- a scalar (number, string, bool, None);
- :class:`Gradient` ``(v0, ..., vK-1)``: numbers interpolate linearly over the layer depth ``t`` in [0, 1]
  (``s = t·(K−1)``, value = ``(1−f)·v[⌊s⌋] + f·v[⌊s⌋+1]``); strings/bools pick ``v[int(t·(K−1))]``;
- :class:`Filtered` ``((filter, setting), ...)``: the first entry whose filter is None, ``"*"`` or a
  substring of the tensor name gives the value (no match: None, i.e. "not set here");
- :class:`Sliced`: one setting per output slice of a recipe (None where the slice sets nothing);
- :class:`Chain`: precedence levels, highest first (slice source > slice > model > global); the first
  level that resolves to a value wins.

A hyperparameter declared ``per_model`` may also be a plain ``list`` with one setting per model.

Depth ``t`` (:class:`Layout`): layer ``i`` of an output slice of ``L`` layers has ``t = i/(L−1)`` (1 when
``L = 1``); tensors outside the numbered layers (embeddings, final norm, head) have ``t = 0`` and belong to
the first slice (embeddings) or the last (everything after the layers), exactly as mergekit 0.1.5 plans
them (``plan.py`` ``plan_module``: both use a reader with ``t = 0``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from llm_merging.core.errors import ConfigError, first_line

SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Gradient:
    """Anchors interpolated over layer depth."""

    anchors: tuple

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ConfigError("a gradient needs at least one value")


@dataclass(frozen=True)
class Filtered:
    """``((filter or None, setting), ...)``: the first entry matching the tensor name wins."""

    entries: tuple


@dataclass(frozen=True)
class Sliced:
    """One setting (or None) per output slice."""

    per_slice: tuple


@dataclass(frozen=True)
class Chain:
    """Precedence levels, highest first; the first that resolves to a value wins."""

    levels: tuple


@dataclass(frozen=True)
class Position:
    """Where a tensor sits: its name, depth ``t`` and output slice index; ``aliases``: its other names
    (a fused expert tensor's part also matches its parameter's in-memory name, a renamed tensor its name on
    disk), which filters match too."""

    name: str
    t: float = 0.0
    slice: int = 0
    aliases: tuple = ()


def evaluate(setting: Any, pos: Position) -> Any:
    """The plain value of ``setting`` for the tensor at ``pos`` (None: not set at this level)."""
    if isinstance(setting, SCALARS):
        return setting
    if isinstance(setting, Gradient):
        values = setting.anchors
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(pos.t * (len(values) - 1))]
        scaled = pos.t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    if isinstance(setting, Filtered):
        for flt, value in setting.entries:
            if flt is None or flt == "*" or (pos.name and flt in pos.name) or any(flt in a for a in pos.aliases):
                return evaluate(value, pos)
        return None
    if isinstance(setting, Sliced):
        return evaluate(setting.per_slice[pos.slice], pos) if pos.slice < len(setting.per_slice) else None
    if isinstance(setting, Chain):
        for level in setting.levels:
            value = evaluate(level, pos)
            if value is not None:
                return value
        return None
    if isinstance(setting, (list, tuple)):
        raise ConfigError(f"a per-model list cannot be nested inside another setting: {setting!r}")
    raise ConfigError(f"unexpected hyperparameter setting {setting!r}")


def leaves(setting: Any) -> Iterator[Any]:
    """Every scalar a setting can resolve to (gradient anchors bound every interpolated value)."""
    if isinstance(setting, Gradient):
        yield from setting.anchors
    elif isinstance(setting, Filtered):
        for _, value in setting.entries:
            yield from leaves(value)
    elif isinstance(setting, (Sliced, Chain)):
        for s in setting.per_slice if isinstance(setting, Sliced) else setting.levels:
            if s is not None:
                yield from leaves(s)
    elif isinstance(setting, (list, tuple)):
        for s in setting:
            yield from leaves(s)
    else:
        yield setting


def map_values(setting: Any, fn) -> Any:
    """``setting`` with ``fn`` applied to every plain value it holds (per-model lists, chains, slices,
    filters, gradient anchors); None entries of a :class:`Sliced` stay None."""
    if isinstance(setting, list):
        return [map_values(s, fn) for s in setting]
    if isinstance(setting, Gradient):
        return Gradient(tuple(fn(v) for v in setting.anchors))
    if isinstance(setting, Filtered):
        return Filtered(tuple((f, map_values(v, fn)) for f, v in setting.entries))
    if isinstance(setting, Sliced):
        return Sliced(tuple(None if v is None else map_values(v, fn) for v in setting.per_slice))
    if isinstance(setting, Chain):
        return Chain(tuple(map_values(v, fn) for v in setting.levels))
    return fn(setting)


def is_structured(setting: Any) -> bool:
    """True when the value may differ between tensors."""
    if isinstance(setting, list):
        return any(is_structured(s) for s in setting)
    return isinstance(setting, (Gradient, Filtered, Sliced, Chain))


def from_yaml(obj: Any, where: str) -> Any:
    """A recipe's value (mergekit syntax) as a setting: a list of scalars is a gradient, a list of
    ``{filter, value}`` mappings (or one mapping) is a filter list whose values may be gradients."""
    if isinstance(obj, SCALARS):
        return obj
    if isinstance(obj, Mapping):
        obj = [obj]
    if isinstance(obj, list):
        if not obj:
            raise ConfigError(f"{where}: empty list")
        if all(isinstance(v, SCALARS) and v is not None for v in obj):
            return Gradient(tuple(obj))
        if all(isinstance(v, Mapping) for v in obj):
            entries = []
            for i, entry in enumerate(obj):
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ConfigError(f"{where}[{i}]: expected {{filter: SUBSTRING, value: V}}, got keys {sorted(entry)}")
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise ConfigError(f"{where}[{i}].filter: expected a string, got {flt!r}")
                value = entry["value"]
                if isinstance(value, Mapping) or isinstance(value, list) and any(isinstance(v, (Mapping, list)) for v in value):
                    raise ConfigError(f"{where}[{i}].value: a filter's value is a scalar or a gradient")
                entries.append((flt, from_yaml(value, f"{where}[{i}].value")))
            return Filtered(tuple(entries))
    raise ConfigError(f"{where}: expected a number, string, bool, a gradient list or a filter list; got {obj!r}")


def to_yaml(setting: Any) -> Any:
    """The inverse of :func:`from_yaml` (for Gradient/Filtered/scalars)."""
    if isinstance(setting, Gradient):
        return list(setting.anchors)
    if isinstance(setting, Filtered):
        out = []
        for flt, value in setting.entries:
            entry = {"filter": flt} if flt is not None else {}
            entry["value"] = to_yaml(value)
            out.append(entry)
        return out
    if isinstance(setting, Chain) and not any(isinstance(level, (Sliced, Chain)) for level in setting.levels):
        # precedence levels without slices are one filter list: each level's entries, then the next level
        entries: list = []
        for level in setting.levels:
            if isinstance(level, Filtered):
                entries += level.entries
            else:
                entries.append((None, level))
                break
        return to_yaml(Filtered(tuple(entries)))
    if isinstance(setting, (Sliced, Chain)):
        raise ValueError("slice-dependent settings are written as recipe slices, not as one value")
    return setting


def parse_cli(text: str, where: str) -> Any | None:
    """``--set`` syntax for structured values (YAML flow): ``{gradient: [1, 0.5]}`` is a gradient and
    ``[{filter: mlp, value: 0.5}, {value: 1}]`` a filter list (a list inside ``value`` is a gradient).
    Returns None when ``text`` is not of that form."""
    stripped = text.strip()
    if not (stripped.startswith("{") or re.match(r"\[\s*\{", stripped)):
        return None
    import yaml

    try:
        obj = yaml.safe_load(stripped)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML flow syntax ({first_line(exc)})") from None
    if isinstance(obj, list) and not all(isinstance(v, Mapping) and "value" in v for v in obj):
        return None  # a per-model list (of gradients / filter lists): the caller splits it
    return cli_object(obj, where)


def cli_object(obj: Any, where: str) -> Any:
    """A parsed ``--set`` object: ``{gradient: [...]}``, a filter list, or a list of those (per model)."""
    if isinstance(obj, Mapping) and set(obj) == {"gradient"}:
        anchors = obj["gradient"]
        if not isinstance(anchors, list) or not anchors or not all(isinstance(v, SCALARS) and v is not None for v in anchors):
            raise ConfigError(f"{where}: 'gradient' takes a non-empty list of values")
        return Gradient(tuple(anchors))
    if isinstance(obj, list) and obj and all(isinstance(v, Mapping) and "value" in v for v in obj):
        return from_yaml(obj, where)
    raise ConfigError(f"{where}: expected {{gradient: [v0, v1, ...]}} or [{{filter: NAME, value: V}}, ..., {{value: DEFAULT}}]")


_LAYER = re.compile(r"(^|\.)(layers|h|block|blocks)\.(\d+)\.")


def layer_index(name: str) -> tuple[str, int] | None:
    """``(prefix, i)`` for a tensor of numbered layer i (``model.layers.3.mlp...`` → ("model.layers", 3))."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return name[: m.start(3) - 1], int(m.group(3))


class Layout:
    """Depth ``t`` and slice index of each tensor of the output model.

    ``slices``: lengths of the output slices in layers, in order (default: one slice of all layers of each
    stack). Every stack of numbered layers (a decoder's ``model.layers``, T5's ``encoder.block`` and
    ``decoder.block``) is laid out on its own.
    """

    def __init__(self, names: Sequence[str], slices: Sequence[int] | None = None,
                 aliases: Mapping[str, tuple] | None = None) -> None:
        self.aliases = dict(aliases or {})  # tensor name -> its other names (Position.aliases)
        counts: dict[str, int] = {}
        for n in names:
            found = layer_index(n)
            if found:
                counts[found[0]] = max(counts.get(found[0], 0), found[1] + 1)
        self.num_layers = counts
        self.slices = list(slices) if slices else None
        for prefix, n in counts.items():
            if self.slices is not None and sum(self.slices) != n:
                raise ConfigError(f"the recipe's slices hold {sum(self.slices)} layers but the output model has {n} ({prefix})")

    def position(self, name: str) -> Position:
        found = layer_index(name)
        if found is None:
            # embeddings come before the layers (first slice), everything else after them (last slice)
            n_slices = len(self.slices) if self.slices else 1
            first = any(k in name for k in ("embed", "wte", "wpe", "shared", "tok_embeddings", "word_embeddings"))
            return Position(name, 0.0, 0 if first else n_slices - 1, self.aliases.get(name, ()))
        prefix, i = found
        lengths = self.slices or [self.num_layers[prefix]]
        start = 0
        for s, length in enumerate(lengths):
            if i < start + length:
                offset = i - start
                return Position(name, offset / (length - 1) if length > 1 else 1.0, s, self.aliases.get(name, ()))
            start += length
        return Position(name, 1.0, len(lengths) - 1, self.aliases.get(name, ()))

    def depth(self, name: str) -> tuple[int, int] | None:
        """``(i, L)``: the tensor is in layer i of its stack of L layers (the whole stack, whatever the recipe's
        slices); None outside the numbered layers. LiNeS scales by this depth (``Merges.lines_factor``)."""
        found = layer_index(name)
        if found is None or found[0] not in self.num_layers:
            return None
        return found[1], self.num_layers[found[0]]


def settings_json(hparams: dict) -> dict:
    """Hyperparameters for report.json: per-tensor settings in recipe (YAML) form."""
    def one(v):
        if isinstance(v, list):
            return [one(x) for x in v]
        if isinstance(v, Chain):  # recipe precedence levels, highest first
            return {"first_set_of": [one(x) for x in v.levels]}
        if isinstance(v, Sliced):
            return {"per_slice": [one(x) for x in v.per_slice]}
        if isinstance(v, Filtered):
            return [{**({"filter": f} if f is not None else {}), "value": one(x)} for f, x in v.entries]
        return to_yaml(v)

    return {k: one(v) for k, v in hparams.items()}
