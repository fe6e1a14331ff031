"""Hyperparameter declarations: defaults, parsing of ``--set KEY=VALUE`` and validation."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

from llm_merging.core.errors import ConfigError
from llm_merging.merging import settings
from llm_merging.model.scoring import SCORINGS

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a merge method.

    ``kind`` is float, int, str or bool. ``per_model`` values may also be a list with one entry per
    expert. ``low``/``high`` bound numbers (``low_open``/``high_open`` exclude the bound);
    ``choices`` restricts strings. ``optional`` admits ``None`` (``--set key=none``).
    """

    default: Any
    help: str
    kind: type = float
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def describe(self) -> str:
        parts = [self.kind.__name__ + ("|list" if self.per_model else "")]
        if self.choices:
            parts.append("{" + ",".join(self.choices) + "}")
        if self.low is not None or self.high is not None:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            parts.append(f"{lo}{'' if self.low is None else self.low}, {'' if self.high is None else self.high}{hi}")
        return " ".join(parts)

    def parse(self, key: str, text: str) -> Any:
        """Turn the text of ``--set key=text`` into a value (not yet validated).

        ``0.7,0.3`` or ``[0.7, 0.3]``: one value per model; ``{gradient: [1, 0.5, 0.1]}``: a gradient over
        layer depth; ``[{filter: mlp, value: 0.5}, {value: 1}]``: a filter list (YAML flow syntax; see
        :mod:`llm_merging.merging.settings`); a list of gradients/filter lists: one per model.
        """
        text = text.strip()
        if self.optional and text.lower() in ("none", "null", ""):
            return None
        structured = settings.parse_cli(text, f"--set {key}")
        if structured is not None:
            return structured
        if text.startswith("[") and "{" in text:  # a per-model list of gradients / filter lists
            import yaml

            try:
                items = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"--set {key}={text}: not a valid list") from None
            if not self.per_model:
                raise ConfigError(f"--set {key}: hyperparameter '{key}' takes a single value, not one per model")
            return [item if isinstance(item, settings.SCALARS) else settings.cli_object(item, f"--set {key}[{i}]")
                    for i, item in enumerate(items)]
        if self.per_model and (text.startswith("[") or "," in text):
            try:
                items = json.loads(text) if text.startswith("[") else [t for t in text.split(",")]
            except json.JSONDecodeError:
                raise ConfigError(f"--set {key}={text}: not a valid list") from None
            if not isinstance(items, list):
                raise ConfigError(f"--set {key}={text}: not a valid list")
            return [self._scalar(key, str(item)) for item in items]
        return self._scalar(key, text)

    def _scalar(self, key: str, text: str) -> Any:
        text = text.strip()
        try:
            if self.kind is bool:
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError
            if self.kind is int:
                return int(text)
            if self.kind is float:
                return float(text)
            return text
        except ValueError:
            raise ConfigError(f"--set {key}={text}: expected {self.kind.__name__}") from None

    def validate(self, key: str, value: Any, n_models: int | None = None) -> Any:
        """Check type, range, choices and per-model list length; return the normalised value."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"hyperparameter '{key}' must not be None")
        if isinstance(value, (list, tuple)):
            if not self.per_model:
                raise ConfigError(f"hyperparameter '{key}' takes a single value, got a list")
            if n_models is not None and len(value) != n_models:
                raise ConfigError(
                    f"hyperparameter '{key}' has {len(value)} values but there are {n_models} models"
                )
            return [self._setting(key, v) for v in value]
        return self._setting(key, value)

    def _setting(self, key: str, setting: Any) -> Any:
        """Check every value a (possibly per-tensor) setting can take; return it normalised."""
        if not settings.is_structured(setting):
            return self._check(key, setting)
        if self.kind is int and any(isinstance(s, settings.Gradient) and len(set(s.anchors)) > 1
                                    for s in _nodes(setting)):
            raise ConfigError(f"hyperparameter '{key}' is an integer: it takes no gradient")
        for leaf in settings.leaves(setting):
            if leaf is not None:
                self._check(key, leaf)
        return settings.map_values(setting, lambda v: v if v is None else self._check(key, v))

    def _check(self, key: str, v: Any) -> Any:
        if self.kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if self.kind is bool and not isinstance(v, bool) or self.kind is not bool and (
            not isinstance(v, self.kind) or isinstance(v, bool)
        ):
            raise ConfigError(f"hyperparameter '{key}' must be {self.kind.__name__}, got {v!r}")
        if self.choices is not None and v not in self.choices:
            raise ConfigError(f"hyperparameter '{key}' must be one of {', '.join(self.choices)}; got {v!r}")
        if self.kind in (int, float):
            if not math.isfinite(v):
                raise ConfigError(f"hyperparameter '{key}' must be a finite number, got {v}")
            if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
                raise ConfigError(f"hyperparameter '{key}'={v} out of range {self.describe()}")
            if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
                raise ConfigError(f"hyperparameter '{key}'={v} out of range {self.describe()}")
        return v


def _nodes(setting: Any):
    yield setting
    children = ()
    if isinstance(setting, settings.Filtered):
        children = [v for _, v in setting.entries]
    elif isinstance(setting, settings.Sliced):
        children = setting.per_slice
    elif isinstance(setting, settings.Chain):
        children = setting.levels
    elif isinstance(setting, (list, tuple)):
        children = setting
    for c in children:
        yield from _nodes(c)


def per_model(value: Any, n_models: int) -> list:
    """Broadcast a scalar hyperparameter to one value per model."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n_models


# Run options (evaluation and output), not merge hyperparameters: --mc-scoring, --adapter-rank, --adapter-energy
# and --adapter-max-rank, with `--set KEY=` as aliases; they live on the method as attributes.
COMMON: dict[str, Param] = {
    "mc_scoring": Param(
        "exact", "multiple-choice scoring: exact log p(choice|prompt), or the starter kit's (skips the first choice token)",
        kind=str, choices=SCORINGS,
    ),
    "adapter_rank": Param(
        None, "rank of the adapter written by --save adapter (default: sum of the input ranks; exact for linear merges)",
        kind=int, low=1, optional=True,
    ),
    "adapter_energy": Param(
        None, "--save adapter: per module the smallest rank keeping this fraction of ΔW's squared Frobenius norm",
        kind=float, low=0.0, low_open=True, high=1.0, optional=True,
    ),
    "adapter_max_rank": Param(
        None, "--save adapter: the largest rank of any module", kind=int, low=1, optional=True,
    ),
}


@dataclass(frozen=True)
class LayerScaling(Param):
    """The LiNeS post-pass ``α,β`` (:data:`LINES`): two finite numbers ≥ 0, or None (off). One value for the
    whole model (λ already varies with depth): no per-model lists, gradients or filters, and not searched
    (its kind is not a number)."""

    def describe(self) -> str:
        return "α,β: two numbers >= 0 | none"

    def parse(self, key: str, text: str) -> Any:
        text = text.strip()
        if text.lower() in ("none", "null", ""):
            return None
        items = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "{" in items or "[" in items:
            raise ConfigError(f"--set {key}={text}: expected two numbers α,β (one value for the whole model)")
        return [_lines_number(key, part) for part in items.split(",")]

    def validate(self, key: str, value: Any, n_models: int | None = None) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # a recipe's "α,β"
            value = self.parse(key, value)
        elif isinstance(value, settings.Gradient):  # a recipe's [α, β] (YAML lists are gradients there)
            value = list(value.anchors)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"hyperparameter '{key}' takes two numbers α,β, got {value!r}")
        if len(value) != 2:
            raise ConfigError(f"hyperparameter '{key}' takes two numbers α,β, got {len(value)} value(s)")
        out = []
        for name, v in zip(("α", "β"), value):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"hyperparameter '{key}': {name} must be a finite number, got {v!r}")
            if v < 0:
                raise ConfigError(f"hyperparameter '{key}': {name}={v} out of range [0, )")
            out.append(float(v))
        return out


def _lines_number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--set {key}: expected two numbers α,β, got {text.strip()!r}") from None


# Post-pass modifiers of the engine's merged task vectors, accepted by every engine method (the default merge()
# adds them to its declared hyperparameters): unlike the run options above they change the merged weights, so
# they are kept in ``hparams`` (report.json, recipe.yml, recipes) once set; they are never searched.
# lines=α,β: LiNeS (Wang et al., ICLR 2025): θ = θ₀ + λ(l)·(θ_merged − θ₀), λ(l) = α + β·l/(L−1) over the blocks.
LINES = LayerScaling(None, "LiNeS post-pass: scale each tensor's merged task vector by α + β·l/(L−1) (block l of L; "
                           "α outside the blocks)", kind=tuple, optional=True)
COMMON["lines"] = LINES
MODIFIERS: tuple[str, ...] = ("lines",)

# Frequently used declarations, so that methods share names and ranges.
WEIGHTS = Param(1.0, "weight of each model (one value, or one per model)", per_model=True)
SCALE = Param(1.0, "scaling λ of the merged task vector", low=0.0)
DENSITY = Param(0.2, "fraction of entries kept per task vector, in (0, 1]", per_model=True, low=0.0, high=1.0, low_open=True)

# TIES sign consensus options (ties_merge and every *_ties variant).
CONSENSUS: dict[str, Param] = {
    "sign_method": Param("total", "sign election: 'total' (sign of the sum) or 'frequency' (majority of signs)",
                         kind=str, choices=("total", "frequency")),
    "weighted_sign": Param(False, "elect signs on weighted task vectors (mergekit)", kind=bool),
    "divisor": Param("count", "disjoint mean divisor: number of agreeing models (paper), their weight sum (mergekit "
                              "normalize: true) or none (mergekit normalize: false)",
                     kind=str, choices=("count", "weight_sum", "none")),
}


#: entries kept per task vector by the top-k trims (ties_merge, magnitude_prune, breadcrumbs, consensus_ties)
KEEP_COUNT = Param("round", "entries kept per task vector: round(density·n) (ours) or floor: int(density·n) (mergekit, PEFT)",
                   kind=str, choices=("round", "floor"))

# Consensus Merging with TALL masks (consensus_ta, consensus_ties).
CONSENSUS_K = Param(2, "keep the entries at least k experts' TALL masks mark (0: no pruning; 1: drop catastrophic "
                       "weights; 2: also selfish ones; the reference's prun_thre_k)", kind=int, low=0)
TALL_LAMBDA = Param(0.6, "λᵢ of the TALL masks |τᵢ| > λᵢ·|τ_MTL − τᵢ| (the paper picks λᵢ in [0.2, 0.6] on "
                         "validation data; 0.6, FusionBench's default, data-free)", per_model=True, low=0.0)
#: consensus_ties' TIES divisor: the reference's disjoint sum by default (``dis-sum``), unlike ties_merge's mean
TALL_DIVISOR = replace(CONSENSUS["divisor"], default="none", choices=("none", "count"),
                       help="TIES disjoint merge: the sum of the agreeing entries (none, the reference's dis-sum) "
                            "or their mean (count, the TIES paper's)")


def consensus_kwargs(hparams: dict) -> dict:
    """The CONSENSUS options a method declares (all of them, or a part, as consensus_ties) in ``hparams``, as
    keyword arguments of the ``ops`` functions (divisor ``"none"`` → None)."""
    out = {key: hparams[key] for key in CONSENSUS if key in hparams}
    if out.get("divisor") == "none":
        out["divisor"] = None
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Split ``KEY=VALUE`` strings (``--set``) into a dict, with a clear error on a bad item."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


# mergekit ``normalize`` for its linear (no consensus) variants: divide the weighted sum by the sum of all the
# weights (left as is where that sum is below 1e-8, as mergekit). The TIES variants override this with the
# consensus divisor.
LINEAR_DIVISOR = Param("none", "divide the weighted sum by the sum of the weights (weight_sum: mergekit normalize: true) "
                               "or not (none)", kind=str, choices=("none", "weight_sum"))
