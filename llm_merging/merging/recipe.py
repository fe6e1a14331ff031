"""Recipes: mergekit 0.1.5 YAML in (``--recipe FILE.yml``) and ``recipe.yml`` out (every run writes one).

Schema (mergekit's ``MergeConfiguration``): ``merge_method``, ``base_model``, ``models`` (each ``model`` and
optional ``parameters``) or ``slices`` (each ``sources`` with ``model``, ``layer_range`` and optional
``parameters``, plus slice ``parameters``), ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` or
``tokenizer`` (``source``, ``tokens``, ``pad_to_multiple_of``), ``chat_template``; a model may be
``BASE+LORA_PATH``. Our additions live under ``llm_merging:`` (``seed``), which mergekit ignores.

``merge_method`` names a mergekit method (mergekit's parameter names and conventions apply, see
:mod:`llm_merging.merging.mergekit_names`) or one of ours, written ``llm_merging.NAME`` (our parameter names
and conventions; ``NAME`` alone works for names mergekit does not have). Values may be scalars, gradients
and filter lists at every level; precedence slice source > slice > model > global.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_merging.core.errors import ConfigError
from llm_merging.core.io import atomic_write_text, check_keys, read_yaml_documents, scratch_directory
from llm_merging.merging import get_method_class, method_targets, settings
from llm_merging.merging.mergekit_names import MERGEKIT_METHODS

logger = logging.getLogger(__name__)

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template", "llm_merging"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model", "residual_weight"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
OURS_KEYS = {"seed", "search"}  # search: the space of --search (llm_merging.search)
DTYPES = ("float32", "float16", "bfloat16")
OUR_PREFIX = "llm_merging."
IGNORED = {"int8_mask"}  # mergekit options with no effect on the values (int8 masks give the same result)
MERGEKIT_REQUIRED = {"weight"}  # mergekit parameters without a default: a model lacking one is an error there too


@dataclass
class Recipe:
    """A recipe resolved to our terms: the method, its models and hyperparameter settings."""

    path: str
    method: str  # our registered method
    mergekit_method: str | None  # the mergekit name it came from (None: our vocabulary)
    base_model: str
    models: list[str]  # expert references (LoRA directories for BASE+LORA)
    hparams: dict[str, Any] = field(default_factory=dict)
    slice_lengths: list[int] | None = None
    slices: list[tuple[str, tuple[int, int]]] | None = None  # passthrough: (model, layer range) per output slice
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer: dict[str, Any] | None = None  # {"source", "tokens", "pad_to_multiple_of"}
    chat_template: str | None = None
    seed: int | None = None
    document: dict[str, Any] = field(default_factory=dict)  # the YAML as read
    base_free: bool = False  # no base_model: base_model is the first model, the template (models[0])
    name: str | None = None  # its ``name`` in a chained recipe (llm_merging.merging.chain)
    chain: list[dict[str, Any]] | None = None  # a chain's final merge: the documents of the merges before it


def _err(path: str, where: str, text: str) -> ConfigError:
    return ConfigError(f"recipe {path}: {where}: {text}")


def read_recipe_document(path: str | Path) -> Any:
    """The one YAML document of a recipe file, with one-line errors (a file of several documents is a
    chained recipe: :func:`llm_merging.merging.chain.load_chain`)."""
    docs = read_yaml_documents(path, f"recipe {path}")
    if not docs:
        raise ConfigError(f"recipe {path}: expected a mapping at the top level, got an empty file")
    if len(docs) > 1:
        raise ConfigError(f"recipe {path}: {len(docs)} YAML documents (a chained recipe); one recipe is one document")
    return docs[0][1]


def _model_ref(path: str, where: str, value: Any, base: str | None) -> tuple[str, bool]:
    """A recipe model reference as (our reference, is_base): ``BASE+LORA`` becomes the LoRA directory."""
    if isinstance(value, dict):  # mergekit's long form {model: {path: ...}, lora: {path: ...}}
        raise _err(path, where, "write models as 'PATH' or 'BASE+LORA_PATH'")
    if not isinstance(value, str) or not value.strip():
        raise _err(path, where, f"expected a model path or hub id, got {value!r}")
    text = value.strip()
    if "+" in text:
        model, _, lora = text.partition("+")
        if base is not None and model != base:
            raise _err(path, where, f"LoRA '{lora}' is applied to '{model}', but the base model is '{base}'; "
                                    "experts must share the base")
        return lora, False
    return text, base is not None and text == base


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe (before any weight is loaded); every error names the file and the key."""
    return parse_recipe(read_recipe_document(path), str(path))


def parse_recipe(doc: Any, path: str) -> Recipe:
    """Check one recipe document already read; ``path`` names it in every error (a file, or one document
    of a chained recipe). Model references are kept as written (nothing is resolved)."""
    doc = check_keys(f"recipe {path}", "", doc, TOP_KEYS)
    name = doc.get("merge_method")
    if not isinstance(name, str) or not name:
        raise _err(path, "merge_method", "missing (e.g. merge_method: ties)")
    ours = method_targets()
    if name.startswith(OUR_PREFIX):
        mk, method = None, name[len(OUR_PREFIX):]
        if method not in ours:
            raise _err(path, "merge_method", f"unknown llm_merging method '{method}' (see --list)")
    elif name in MERGEKIT_METHODS:
        mk, method = MERGEKIT_METHODS[name], MERGEKIT_METHODS[name].ours
    elif name in ours:
        mk, method = None, name
    else:
        import difflib

        close = difflib.get_close_matches(name, list(MERGEKIT_METHODS) + list(ours), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise _err(path, "merge_method", f"unknown merge method '{name}'{hint}")

    base = doc.get("base_model")
    if base is not None and (not isinstance(base, str) or "+" in base):
        raise _err(path, "base_model", f"expected a model path or hub id, got {base!r}")
    if ("models" in doc) == ("slices" in doc):
        raise _err(path, "models", "give exactly one of 'models' or 'slices'")
    if base is None and method == "passthrough":  # BASE+LORA sources name the base their adapters apply to
        named = [m.get("model") if isinstance(m, dict) else m for m in doc.get("models") or []]
        named += [src.get("model") for sl in doc.get("slices") or [] if isinstance(sl, dict)
                  for src in sl.get("sources") or [] if isinstance(src, dict)]
        bases = list(dict.fromkeys(m.partition("+")[0] for m in named if isinstance(m, str) and "+" in m))
        if len(bases) > 1:
            raise _err(path, "base_model", f"LoRA sources apply to different bases ({', '.join(bases)}); "
                                           "one recipe merges over one base")
        if bases:
            base = bases[0]
    base_free = base is None  # the first model is the template (config, tokenizer, tensors no model changes)
    if base_free:
        cls = get_method_class(method)
        if not cls.base_optional:  # a mergekit name's needs_base says the same (tests/test_recipes.py)
            raise _err(path, "base_model", f"missing: merge method '{name}' needs a base_model: "
                                           f"{cls.needs_base_because}")
        named = [m.get("model") if isinstance(m, dict) else m for m in doc.get("models") or []]
        named += [src.get("model") for sl in doc.get("slices") or [] if isinstance(sl, dict)
                  for src in sl.get("sources") or [] if isinstance(src, dict)]
        lora = next((m for m in named if isinstance(m, str) and "+" in m), None)
        if lora is not None:
            raise _err(path, "base_model", f"missing: '{lora}' is a LoRA adapter on a base model, and a merge "
                                           "without a base_model takes full models; set base_model")

    # Gather settings by level, in mergekit's names: global, per model (by reference), per slice.
    global_params = _params(path, "parameters", doc.get("parameters"))
    refs: list[str] = []
    model_params: dict[str, dict] = {}
    base_listed = False
    slice_lengths = None
    slice_params: list[dict] = []
    source_params: list[dict[str, dict]] = []
    if "models" in doc:
        if not isinstance(doc["models"], list) or not doc["models"]:
            raise _err(path, "models", "expected a non-empty list")
        for i, entry in enumerate(doc["models"]):
            where = f"models[{i}]"
            entry = check_keys(f"recipe {path}", where, {"model": entry} if isinstance(entry, str) else entry,
                               MODEL_KEYS)
            ref, is_base = _model_ref(path, f"{where}.model", entry.get("model"), base)
            if is_base:
                base_listed = True
            if ref in model_params or (is_base and "__base__" in model_params):
                raise _err(path, f"{where}.model", f"'{entry.get('model')}' is listed twice")
            key = "__base__" if is_base else ref
            model_params[key] = _params(path, f"{where}.parameters", entry.get("parameters"))
            refs.append(key)
    else:
        slices = doc["slices"]
        if not isinstance(slices, list) or not slices:
            raise _err(path, "slices", "expected a non-empty list")
        slice_lengths = []
        order: list[str] | None = None
        start = 0
        for k, sl in enumerate(slices):
            where = f"slices[{k}]"
            sl = check_keys(f"recipe {path}", where, sl, SLICE_KEYS)
            if sl.get("base_model") is not None or sl.get("residual_weight") is not None:
                raise _err(path, f"{where}.base_model", "per-slice base models and residual weights are not supported")
            sources = sl.get("sources")
            if not isinstance(sources, list) or not sources:
                raise _err(path, f"{where}.sources", "expected a non-empty list")
            if method == "passthrough" and len(sources) != 1:
                raise _err(path, f"{where}.sources", f"passthrough takes exactly one source per slice, got {len(sources)}")
            these, per_source, length = [], {}, None
            for j, src in enumerate(sources):
                sw = f"{where}.sources[{j}]"
                src = check_keys(f"recipe {path}", sw, src, SOURCE_KEYS)
                ref, is_base = _model_ref(path, f"{sw}.model", src.get("model"), base)
                key = "__base__" if is_base else ref
                base_listed |= is_base
                lr = src.get("layer_range")
                if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                        or lr[0] < 0 or lr[1] <= lr[0]):
                    raise _err(path, f"{sw}.layer_range", f"expected [start, end) with 0 <= start < end, got {lr!r}")
                if length is not None and lr[1] - lr[0] != length:
                    raise _err(path, f"{sw}.layer_range", "every source of a slice must have the same number of layers")
                length = lr[1] - lr[0]
                if method != "passthrough" and lr[0] != start:
                    raise _err(path, f"{sw}.layer_range", f"{lr} does not line up with the output layers "
                                                          f"[{start}, {start + length}); only passthrough rearranges layers")
                these.append(key)
                per_source[key] = _params(path, f"{sw}.parameters", src.get("parameters"))
                per_source.setdefault("__ranges__", {})[key] = tuple(lr)
            if method != "passthrough":
                if order is None:
                    order = these
                elif these != order:
                    raise _err(path, f"{where}.sources", f"models {these} differ from the first slice's {order}; "
                                                         "only passthrough takes other models per slice")
            slice_lengths.append(length)
            slice_params.append(_params(path, f"{where}.parameters", sl.get("parameters")))
            source_params.append(per_source)
            start += length
        refs = order if order is not None else []
        if method == "passthrough":  # one source per slice: its parameters are the slice's
            passthrough_slices = []
            for k, per_source in enumerate(source_params):
                (key, lr), = per_source.pop("__ranges__").items()
                slice_params[k] = {**slice_params[k], **per_source.pop(key)}
                passthrough_slices.append((key, lr))
            refs = list(dict.fromkeys(key for key, _ in passthrough_slices))
    if base_free:
        base = refs[0]  # the template: config and tokenizer of the first model, as mergekit's
    if method == "passthrough" and "models" in doc:
        if len(refs) != 1:
            raise _err(path, "models", f"passthrough copies exactly one model, got {len(refs)}; use slices to stack layers")
    if method == "passthrough":
        if "slices" not in doc:
            passthrough_slices = None
        for params in model_params.values():  # one model: its parameters are global
            global_params = {**global_params, **params}
        hparams = _our_settings(path, method, mk, [], global_params, {}, slice_params, [])
        slices = [(base if k == "__base__" else k, lr) for k, lr in passthrough_slices] if passthrough_slices else None
        return _finish(path, doc, name, mk, method, base, [base if r == "__base__" else r for r in refs], hparams,
                       slice_lengths, slices)

    experts = [r for r in refs if r != "__base__" or (mk is not None and mk.base_as_model)]
    if mk is not None and mk.base_as_model and not base_free:
        # mergekit adds the base as an input when it is not listed, and puts it first (slerp: t = 0 is the base)
        experts = ["__base__", *(r for r in experts if r != "__base__")]
    hparams = _our_settings(path, method, mk, experts, global_params, model_params, slice_params, source_params)
    return _finish(path, doc, name, mk, method, base, [base if r == "__base__" else r for r in experts], hparams,
                   slice_lengths, None)


def _finish(path, doc, name, mk, method, base, models, hparams, slice_lengths, slices) -> Recipe:
    """The output options shared by every recipe, then the Recipe."""

    tok = None
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        raise _err(path, "tokenizer", "give 'tokenizer_source' or 'tokenizer', not both")
    if doc.get("tokenizer_source") is not None:
        tok = {"source": _tokenizer_source(path, "tokenizer_source", doc["tokenizer_source"], base)}
    elif doc.get("tokenizer") is not None:
        t = check_keys(f"recipe {path}", "tokenizer", doc["tokenizer"], TOKENIZER_KEYS)
        tok = {"source": _tokenizer_source(path, "tokenizer.source", t.get("source", "union"), base),
               "tokens": t.get("tokens") or {}, "pad_to_multiple_of": t.get("pad_to_multiple_of")}
        pad = tok["pad_to_multiple_of"]
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise _err(path, "tokenizer.pad_to_multiple_of", f"expected a positive integer, got {pad!r}")
        if not isinstance(tok["tokens"], dict):
            raise _err(path, "tokenizer.tokens", "expected a mapping of token -> {source, force}")
    chat = doc.get("chat_template")
    if chat is not None and not isinstance(chat, str):
        raise _err(path, "chat_template", "expected a template string or a model name")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if value is not None and str(value).replace("torch.", "") not in DTYPES:
            raise _err(path, key, f"expected one of {', '.join(DTYPES)}, got {value!r}")
        dtypes[key] = None if value is None else str(value).replace("torch.", "")
    extra = check_keys(f"recipe {path}", "llm_merging", doc.get("llm_merging") or {}, OURS_KEYS)
    seed = extra.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _err(path, "llm_merging.seed", f"expected an integer, got {seed!r}")
    return Recipe(
        path=path, method=method, mergekit_method=name if mk is not None else None, base_model=base,
        models=models, hparams=hparams, slice_lengths=slice_lengths, slices=slices,
        dtype=dtypes["dtype"], out_dtype=dtypes["out_dtype"], tokenizer=tok, chat_template=chat, seed=seed,
        document=doc, base_free=doc.get("base_model") is None and bool(models) and models[0] == base,
    )


def _params(path: str, where: str, obj: Any) -> dict:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise _err(path, where, f"expected a mapping of parameter -> value, got {type(obj).__name__}")
    return {str(k): settings.from_yaml(v, f"recipe {path}: {where}.{k}") for k, v in obj.items()}


def _tokenizer_source(path: str, where: str, value: Any, base: str | None) -> str:
    if value in ("base", "union"):
        return value
    if isinstance(value, str) and value:
        return value.partition("+")[0] if "+" in value else value
    raise _err(path, where, f"expected base, union or a model, got {value!r}")


def _our_settings(path, method, mk, experts, global_params, model_params, slice_params, source_params) -> dict:
    """Combine the levels into our hyperparameter settings (our names), checking every key."""
    cls = get_method_class(method)
    specs = cls.all_hyperparameters() if hasattr(cls, "all_hyperparameters") else {}
    rename = (lambda k: mk.params.get(k)) if mk is not None else (lambda k: k if k in specs else None)

    def check(where: str, key: str) -> str | None:
        if mk is not None and key in IGNORED:
            return None
        ours = rename(key)
        if ours is None or ours not in specs:
            known = sorted(mk.params) if mk is not None else sorted(specs)
            raise _err(path, f"{where}.{key}", f"unknown parameter for merge method '{mk.name if mk else method}' "
                                               f"(known: {', '.join(known) or 'none'})")
        return ours

    levels: dict[str, dict[str, Any]] = {}  # our key -> {"global": s, "slices": [...], "models": {ref: s}, ...}
    for key, value in global_params.items():
        if (ours := check("parameters", key)) is not None:
            levels.setdefault(ours, {})["global"] = value
    for ref, params in model_params.items():
        for key, value in params.items():
            if (ours := check(f"models[{ref}].parameters", key)) is None:
                continue
            if not specs[ours].per_model:
                raise _err(path, f"models[{ref}].parameters.{key}", "is a global parameter: set it under 'parameters'")
            levels.setdefault(ours, {}).setdefault("models", {})[ref] = value
    for k, params in enumerate(slice_params):
        for key, value in params.items():
            if (ours := check(f"slices[{k}].parameters", key)) is not None:
                levels.setdefault(ours, {}).setdefault("slices", {})[k] = value
    for k, per_source in enumerate(source_params):
        for ref, params in per_source.items():
            if ref == "__ranges__":
                continue
            for key, value in params.items():
                if (ours := check(f"slices[{k}].sources[{ref}].parameters", key)) is None:
                    continue
                if not specs[ours].per_model:
                    raise _err(path, f"slices[{k}].sources.parameters.{key}", "is a global parameter: set it per slice")
                levels.setdefault(ours, {}).setdefault("sources", {}).setdefault(ref, {})[k] = value

    n_slices = len(slice_params)
    out: dict[str, Any] = dict(mk.fixed) if mk is not None else {}
    if mk is not None:
        for mk_key, value in mk.defaults.items():  # mergekit's defaults where ours differ
            out[mk.params[mk_key]] = value
    for ours, lv in levels.items():
        def sliced(by_slice: dict[int, Any]) -> Any:
            return settings.Sliced(tuple(by_slice.get(k) for k in range(n_slices))) if by_slice else None

        shared = [s for s in (sliced(lv.get("slices", {})), lv.get("global")) if s is not None]
        if specs[ours].per_model and ("models" in lv or "sources" in lv):
            per = []
            for ref in experts:
                chain = [s for s in (sliced(lv.get("sources", {}).get(ref, {})), lv.get("models", {}).get(ref)) if s is not None]
                chain += shared
                value = _chain(chain, out.get(ours))
                if value is None and not specs[ours].optional:
                    theirs = next((k for k, v in (mk.params.items() if mk else []) if v == ours), ours)
                    value = specs[ours].default[len(per)] if isinstance(specs[ours].default, list) else specs[ours].default
                    if value is None or (mk is not None and theirs in MERGEKIT_REQUIRED):
                        name = ref if ref != "__base__" else "the base model"
                        raise _err(path, f"models[{name}].parameters.{theirs}",
                                   "missing: every model needs a value (mergekit requires it too)")
                per.append(value)
            out[ours] = per
        else:
            out[ours] = _chain(shared, out.get(ours))
    if mk is not None:
        out = mk.translate(out)
    return out


def _chain(levels: list, fallback: Any) -> Any:
    """Levels highest first; ``fallback`` (a fixed value) joins when the lowest level may leave it unset."""
    if fallback is not None and (not levels or isinstance(levels[-1], (settings.Filtered, settings.Sliced, settings.Chain))):
        levels = [*levels, fallback]
    if not levels:
        return fallback
    return levels[0] if len(levels) == 1 else settings.Chain(tuple(levels))


def apply_recipe(method, recipe: Recipe) -> None:
    """Give ``method`` the recipe's models, hyperparameters, slices and output options."""
    method.base_model_name = recipe.base_model
    method.base_model_revision_id = None
    method.base_free = recipe.base_free
    method.list_models = list(recipe.models)
    if method.uses_engine():
        method.is_peft = None  # detect each expert's kind
    method.slice_lengths = recipe.slice_lengths
    if recipe.slices is not None:
        method.slices = list(recipe.slices)
    method.recipe = recipe
    method.set_hyperparameters(recipe.hparams)
    method.recipe_hparams = dict(method.hparams)  # as the recipe set them (before --set or a search)


# ------------------------------------------------------------------ writing recipe.yml
def recipe_document(method, models_info: dict | None, *, dtype: str | None, seed: int) -> dict | list[dict]:
    """The recipe that reproduces a run: the recipe it came from (hub models pinned to the revisions used;
    a chained recipe's final merge: every document of the chain), or, for a CLI run, every hyperparameter in
    mergekit's vocabulary when the run is exactly a mergekit merge (checked by reading it back), else in ours."""
    recipe = method.recipe
    models_info = models_info or {}
    # recipe_hparams is None only where ``recipe`` was set without apply_recipe: nothing to compare with
    changed = recipe is not None and method.recipe_hparams is not None and method.hparams != method.recipe_hparams
    structured = recipe is not None and (recipe.slices is not None or recipe.slice_lengths is not None
                                         or recipe.tokenizer is not None or recipe.chat_template is not None)
    if recipe is not None and (not changed or structured):
        if changed:  # refused in preflight (runner); never expected here
            logger.warning("recipe.yml: the run's values differ from recipe %s, which has slices or a tokenizer "
                           "setting; the recipe is written as read", recipe.path)
        doc = reproducing_document(recipe.document, models_info, dtype=dtype, seed=seed)
        if recipe.chain is not None:  # a chain's final merge: recipe.yml holds every merge of the chain
            return [*recipe.chain, {"name": recipe.name, **doc} if recipe.name is not None else doc]
        return doc
    experts = models_info.get("experts") or [{"id": r.id, "revision": r.revision} for r in method.model_refs()]
    base = models_info.get("base") or {"id": method.base_ref().id, "revision": method.base_ref().revision}
    if method.base_free:
        base = None  # a merge without a base model: the template is the first of the models
    specs = method.all_hyperparameters()
    ours = {k: v for k, v in method.hparams.items() if k in specs}
    for mk in MERGEKIT_METHODS.values():
        if mk.ours == method.name:
            doc = _mergekit_document(mk, ours, specs, base, experts, dtype, seed)
            if doc is not None:
                return _with_recipe_outputs(doc, recipe)
    name = method.name
    doc = _document(OUR_PREFIX + name if name in MERGEKIT_METHODS else name, ours, specs, base, experts, dtype, seed)
    return _with_recipe_outputs(doc, recipe)


def reproducing_document(document: dict, models_info: dict | None, *, dtype: str | None, seed: int) -> dict:
    """A recipe document as a run used it: hub models pinned to the revisions used (``models_info``: the
    ``report.json`` ``models`` of the run), the seed and the dtype of the run."""
    doc = _pin_document(document, models_info or {})
    doc["llm_merging"] = {**(doc.get("llm_merging") or {}), "seed": seed}
    if dtype:
        doc["dtype"] = dtype  # the dtype the run used (--dtype may override the recipe's)
    return doc


def _with_recipe_outputs(doc: dict, recipe: Recipe | None) -> dict:
    """A rebuilt document keeps the recipe's output dtype."""
    if recipe is not None and recipe.out_dtype:
        doc["out_dtype"] = recipe.out_dtype
    return doc


def _document(name: str, values: dict, specs: dict, base: dict | None, experts: list, dtype, seed) -> dict:
    doc: dict[str, Any] = {"merge_method": name}
    if base is not None:
        doc["base_model"] = _pinned(base)
    global_params: dict[str, Any] = {}
    per_model: list[dict[str, Any]] = [{} for _ in experts]
    for key, value in values.items():
        spec = specs.get(key)
        if isinstance(value, list) and (spec is None or spec.per_model):
            for i, v in enumerate(value):
                per_model[i][key] = settings.to_yaml(v)
        else:
            global_params[key] = settings.to_yaml(value)
    doc["models"] = [{"model": _pinned(e), **({"parameters": p} if p else {})} for e, p in zip(experts, per_model)]
    if global_params:
        doc["parameters"] = global_params
    if dtype:
        doc["dtype"] = dtype
    doc["llm_merging"] = {"seed": seed}
    return doc


def _mergekit_document(mk, values: dict, specs: dict, base: dict, experts: list, dtype, seed) -> dict | None:
    """``values`` as a recipe for mergekit's ``mk.name``, or None when mergekit's conventions give another
    merge (e.g. our TIES divisor 'count', a keep count mergekit does not have)."""
    inverse = {ours: theirs for theirs, ours in mk.params.items()}
    theirs: dict[str, Any] = {}
    for key, value in values.items():
        if key in inverse:
            if key == "divisor":  # mergekit's normalize (TIES family)
                if value not in ("weight_sum", "none"):
                    return None
                value = value == "weight_sum"
            theirs[inverse[key]] = value
    doc = _document(mk.name, theirs, {inverse[k]: specs[k] for k in inverse if k in specs}, base, experts, dtype, seed)
    with scratch_directory("recipe") as tmp:  # read it back: the same method and values, or not mergekit's
        path = Path(tmp) / "recipe.yml"
        path.write_text(dump(doc), encoding="utf-8")
        try:
            back = load_recipe(path)
        except ConfigError:
            return None
    if back.method != mk.ours or len(back.models) != len(experts):
        return None
    for key, value in values.items():
        got = back.hparams.get(key, specs[key].default)
        n = len(experts)
        want_v, got_v = (specs[key].validate(key, v, n) for v in (value, got))
        if isinstance(want_v, list) != isinstance(got_v, list):
            want_v, got_v = (v if isinstance(v, list) else [v] * n for v in (want_v, got_v))
        if want_v != got_v:
            return None
    return doc


def _pin_document(doc: dict, models_info: dict) -> dict:
    """A copy of ``doc`` whose hub models carry the commit they resolved to (``id@commit``)."""
    import copy

    pins = {}
    for info in [models_info.get("base") or {}, *(models_info.get("experts") or [])]:
        if info.get("id") and info.get("resolved_revision") and not Path(str(info["id"])).exists():
            pins[str(info["id"])] = f"{info['id']}@{info['resolved_revision']}"
    doc = copy.deepcopy(doc)

    def pin(ref: Any) -> Any:
        if not isinstance(ref, str) or "@" in ref:
            return ref
        return "+".join(pins.get(part, part) for part in ref.split("+"))

    if "base_model" in doc:
        doc["base_model"] = pin(doc["base_model"])
    for i, entry in enumerate(doc.get("models") or []):
        if isinstance(entry, dict):
            entry["model"] = pin(entry.get("model"))
        else:  # the short form: a list of model names
            doc["models"][i] = pin(entry)
    for sl in doc.get("slices") or []:
        for src in sl.get("sources") or []:
            src["model"] = pin(src.get("model"))
    return doc


def _pinned(info: dict) -> str:
    rev = info.get("resolved_revision") or info.get("revision")
    return f"{info['id']}@{rev}" if rev and not Path(str(info["id"])).exists() else str(info["id"])


def dump(doc: dict | list[dict]) -> str:
    """YAML text of a recipe document, or of several (a chained recipe: one YAML document each)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper, data):  # numbers in flow style, as mergekit writes them
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, represent_list)
    if isinstance(doc, list):
        return yaml.dump_all(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, explicit_start=True)
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def write_recipe(path: Path, doc: dict | list[dict]) -> Path:
    atomic_write_text(path, dump(doc))
    return path
