"""mergekit 0.1.5 method names and parameters in our terms, for ``--recipe`` (``llm_merging.merging.recipe``).

Each entry maps a mergekit ``merge_method`` to one of our registered methods: mergekit parameter names to
ours (``params``), our hyperparameters fixed to mergekit's conventions (``fixed``), mergekit's defaults where
ours differ (``defaults``, in mergekit names), and a final value translation (``translate``) for parameters
whose meaning differs (mergekit ``normalize`` → our ``divisor``, mergekit ``rescale`` → our ``rescale``).
``base_as_model``: the base model is one of the inputs (it gets τ = 0 and its own weight), as in mergekit's
``linear``/``slerp``; otherwise a listed base model is the reference only, as in mergekit's task-arithmetic
family. ``needs_base``: mergekit refuses the method without a ``base_model`` (``linear``, ``karcher``,
``nuslerp``, ``multislerp`` and ``passthrough`` take none: the first model is then the template of the
output, and the models' own weights are merged); it equals ``not base_optional`` of the method it maps to,
which is what a recipe checks.

mergekit 0.1.5 conventions and how each is matched (checked by ``benchmarks/mergekit_parity.py``, which
runs ``mergekit-yaml`` and ``--recipe`` on the same YAML and compares every tensor):

- ``task_arithmetic``, ``ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``dare_*``, ``della*`` (its
  "generalized task arithmetic"): deltas are multiplied by their weights before the sign election
  (``weighted_sign=True``, ``sign_method=total``); ``normalize: true`` divides by the sum of the agreeing
  weights with consensus (``divisor=weight_sum``) and by the sum of all the weights without
  (``divisor=weight_sum`` on the linear variants, skipped where |Σ w| < 1e-8); ``normalize: false`` is
  ``divisor=none``. Defaults: ``density`` 1, ``lambda`` 1, ``normalize`` true for ``ties``/``della`` and
  false otherwise, ``rescale`` (L1-norm rescale of DARE/DELLA masks, ``rescale=l1``) true for
  ``dare_*``/``della*``, ``gamma`` 0.01, ``epsilon`` 0.15.
- keep counts: mergekit keeps ``int(density·n)`` entries (``magnitude``: at least 1; ``magnitude_outliers``:
  ``int(density·n)`` kept, ``int(gamma·n)`` outliers dropped): ``keep_count=floor``.
- ``slerp``: interpolates the full weights from the base (t = 0) to the other model (t = 1): our ``slerp``
  with ``space=weights`` and the base as the first of the two models (τ = 0).
- ``model_stock``: the mean cosine is not clamped (t < 0 for negative agreement), the norm product is
  clamped to 1e-6 and t = 0 at the singularity: ``extrapolate=true``.
- ``linear``: Σ wᵢθᵢ / Σ wᵢ over the listed models and the base (mergekit adds ``base_model`` as an input
  when it is not listed; it then needs a weight, e.g. a global one).

Not matched (documented differences):

- ties at the selection threshold (equal magnitudes, common in fp16/bf16): we keep the lowest flat indices,
  mergekit whatever ``argsort``/``sort`` returns; identical whenever magnitudes are distinct (e.g. fp32
  fine-tunes), so compare in fp32.
- DARE and DELLA masks are random: we draw them from ``--seed`` and the tensor name on the CPU, mergekit
  from torch's global generator; they agree in distribution only.
- DELLA: mergekit rejects ``density ± epsilon`` reaching 0 or 1; we accept the closed interval.
- ``slerp`` of a (near-)zero tensor (norm ≤ 1e-8): we interpolate linearly, mergekit does not normalise it
  and interpolates with θ ≈ π/2.
- ``lambda`` < 0 is rejected (our ``scale`` is ≥ 0); ``model_stock`` ``filter_wise`` on tensors with more
  than 2 dimensions: mergekit takes cosines over the last dimension, we over all but the first.
- ``rescale`` on the magnitude-pruning methods (``ties``, ``breadcrumbs*``) and ``density`` on
  ``task_arithmetic`` (where mergekit ignores it) are rejected as unknown parameters.
- rounding: mergekit accumulates slerp's and model_stock's norms and dot products in fp32, we in fp64; on
  the 1M-entry embedding of ``benchmarks/mergekit_parity.py --hidden 256 --vocab 4096`` its slerp is
  5.4e-6 (relative) from the fp64 value and ours 8e-8, so the gap grows with tensor size. ``multislerp``:
  mergekit's tangent-space step, zero in exact arithmetic, scales the result by 1 + (its fp32 rounding of the
  dot products); on the 1M-entry head without a base, mergekit is 2.3e-5 from the fp64 value, ours 1.4e-7.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from llm_merging.merging import settings


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


def _normalize_to_divisor(values: dict) -> dict:
    """mergekit ``normalize`` → our ``divisor`` (weight sum or none); mergekit ``rescale`` → our ``rescale``
    (``true``: L1-norm rescale of the pruned deltas, ``false``: none)."""
    if "divisor" in values:
        values["divisor"] = settings.map_values(values["divisor"], lambda v: "weight_sum" if v is True else ("none" if v is False else v))
    if "rescale" in values:
        values["rescale"] = settings.map_values(values["rescale"], lambda v: "l1" if v is True else ("none" if v is False else v))
    return values


_GTA = {"weight": "weights", "density": "density", "lambda": "scale", "normalize": "divisor"}


def _gta(name: str, ours: str, consensus: bool, normalize: bool, rescale: bool | None = None, sparsify: bool = True,
         extra: dict | None = None, fixed: dict | None = None, defaults: dict | None = None) -> MergekitMethod:
    """A mergekit generalized-task-arithmetic method (``merge_methods/registry.py``) and its defaults."""
    params = {**_GTA, **(extra or {})}
    d = {"density": 1.0, "lambda": 1.0, "normalize": normalize, **(defaults or {})}
    if not sparsify:  # task_arithmetic: mergekit accepts a density there and ignores it; we reject it
        del params["density"], d["density"]
    if rescale is not None:  # the random (DARE, DELLA) sparsifications
        params["rescale"] = "rescale"
        d["rescale"] = rescale
    f = dict(fixed or {})
    if consensus:
        f.update({"weighted_sign": True, "sign_method": "total"})
    return MergekitMethod(name, ours, params, fixed=f, defaults=d, convert=_normalize_to_divisor)


_FLOOR = {"keep_count": "floor"}

MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    m.name: m
    for m in (
        MergekitMethod("linear", "linear", {"weight": "weights", "normalize": "normalize"},
                       defaults={"normalize": True}, base_as_model=True, needs_base=False),
        _gta("task_arithmetic", "task_arithmetic", consensus=False, normalize=False, sparsify=False),
        _gta("ties", "ties_merge", consensus=True, normalize=True, fixed=_FLOOR),
        _gta("dare_linear", "dare_linear", consensus=False, normalize=False, rescale=True),
        _gta("dare_ties", "dare_ties", consensus=True, normalize=False, rescale=True),
        _gta("breadcrumbs", "breadcrumbs", consensus=False, normalize=False, extra={"gamma": "gamma"},
             fixed=_FLOOR, defaults={"gamma": 0.01}),
        _gta("breadcrumbs_ties", "breadcrumbs_ties", consensus=True, normalize=False, extra={"gamma": "gamma"},
             fixed=_FLOOR, defaults={"gamma": 0.01}),
        _gta("della", "della", consensus=True, normalize=True, rescale=True, extra={"epsilon": "epsilon"},
             defaults={"epsilon": 0.15}),
        _gta("della_linear", "della_linear", consensus=False, normalize=False, rescale=True,
             extra={"epsilon": "epsilon"}, defaults={"epsilon": 0.15}),
        MergekitMethod("slerp", "slerp", {"t": "t"}, fixed={"space": "weights"}, base_as_model=True),
        MergekitMethod("model_stock", "model_stock", {"filter_wise": "filter_wise"}, fixed={"extrapolate": True}),
    )
}

# mergekit methods whose names are ours too, with mergekit's parameter names where ours differ.
MERGEKIT_METHODS.update({
    m.name: m
    for m in (
        MergekitMethod("nuslerp", "nuslerp", {"weight": "weights", "nuslerp_flatten": "nuslerp_flatten",
                                              "nuslerp_row_wise": "nuslerp_row_wise"}, needs_base=False),
        MergekitMethod("multislerp", "multislerp", {"weight": "weights", "normalize_weights": "normalize_weights",
                                                    "eps": "eps"}, needs_base=False),
        # mergekit adds the base to karcher's inputs (once): it is listed as a τ = 0 model instead
        MergekitMethod("karcher", "karcher", {"max_iter": "max_iter", "tol": "tol"}, fixed={"include_base": False},
                       base_as_model=True, needs_base=False),
        MergekitMethod("sce", "sce", {"select_topk": "select_topk"}),
        MergekitMethod("ram", "ram", {"epsilon": "epsilon"}),
        MergekitMethod("ramplus_tl", "ramplus_tl", {"r": "r", "alpha": "alpha", "epsilon": "epsilon"}),
        MergekitMethod("nearswap", "nearswap", {"t": "t"}),
        MergekitMethod("arcee_fusion", "arcee_fusion", {}),
        MergekitMethod("passthrough", "passthrough", {"scale": "scale"}, needs_base=False),
    )
})
