"""Exact task vectors of PEFT LoRA adapters, one base parameter at a time.

A LoRA adapter changes a base weight W by ``ΔW = s · B · A`` with ``s = lora_alpha / r`` (``lora_alpha / √r``
with ``use_rslora``), where ``r`` and ``lora_alpha`` may be overridden per module by ``rank_pattern`` /
``alpha_pattern`` (PEFT's matching: a pattern key matches a module name when the name is the key or ends
with ``.<key>``, the key being a regular expression; the first matching key wins). ``ΔW`` is transposed for
layers stored as (in, out) (GPT-2's Conv1D, ``fan_in_fan_out``) and for embeddings. Full tensors saved next to
the factors (``modules_to_save``, a classification head, an embedding's ``base_layer``) replace the base
tensor, so their task vector is ``saved - base``; ``trainable_token_indices`` replace single rows.

Two variants are read exactly as PEFT's ``merge_and_unload`` applies them:

* **LoRA on bare parameters** (``target_parameters``, PEFT's ``ParamWrapper``), e.g. the fused expert tensors of
  transformers' mixture-of-experts blocks (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) and a router
  weight. A 2-D parameter gets ``ΔW = s·B·A``. A 3-D parameter of E experts has ``A`` of shape (E·r, in) (rows
  expert by expert) and ``B`` of shape (out, r·E) (columns rank-major: column ``j·E + e`` is expert e's j-th);
  expert e's ``ΔW_e = s·B_e·A_e`` is stored as (out, in) for parameters laid out (E, out, in) and transposed for
  layouts (E, in, out) (gpt-oss); when both fit (square experts) the module's other parameters decide. Several
  parameters of one module nest their wrappers: the module's first targeted parameter (in its
  ``named_parameters`` order) is the innermost, saved under ``<module>.base_layer…``. ``r`` / ``lora_alpha``
  patterns match the parameter's full name.
* **DoRA** (``use_dora``, saved ``<module>.lora_magnitude_vector``): with V = W + s·B·A in (out, in) orientation,
  the merged weight is ``m ⊙ V / ‖V‖`` with the norm over each output row (over everything but the output
  channel for convolutions; per embedding dimension for embeddings), so ``ΔW = m ⊙ V/‖V‖ − W`` depends on the
  base weight.

Neither is a product of one (out, r) and one (r, in) matrix: `LoraAdapter.factors` returns None for them and
`LoraAdapter.low_rank_only` False, so methods and writers treat them as full task vectors. Other variants, and
layouts that cannot be read exactly, are refused with one line.

`LoraAdapter` follows the expert protocol shared with `llm_merging.model.checkpoint.FullExpert`:
``name``, ``bind(shapes)``, ``param_names()``, ``delta(param_name, base)``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from llm_merging.core.errors import AdapterError, first_line
from llm_merging.model.checkpoint import (
    EMBED_CANDIDATES,
    load_torch_file,
    match_names,
    name_summary,
    open_safetensors,
    shape_str,
)
from llm_merging.model.refs import ADAPTER_CONFIG, is_adapter_dir  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_EMB_RE = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_TOKENS_RE = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_MAG_RE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[^.]+)*$")
_LORA_MARK_RE = re.compile(r"(^|\.)lora_[A-Za-z_]*(\.|$)")
_BASE_LAYER = ".base_layer"

# LoRA variants whose merged weight is not base + s·B·A (or that cannot be merged at all)
_VARIANT_FIELDS = {
    "lora_bias": "lora_bias=true",
    "use_qalora": "QALoRA (use_qalora=true)",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "layer_replication": "layer_replication",
}
# initialisations that modify the base weights: the saved factors are relative to a different base
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key ``k`` such that the module name
    fully matches ``(.*\\.)?(k)``; the module name itself when none does."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _strip_adapter_name(name: str) -> str:
    """Remove PEFT wrapper segments from a saved full-tensor name."""
    parts = name.split(".")
    out = []
    skip_default = False
    for p in parts:
        if skip_default and p == "default":
            skip_default = False
            continue
        skip_default = False
        if p in ("modules_to_save", "base_layer", "original_module"):
            skip_default = p == "modules_to_save"
            continue
        out.append(p)
    return ".".join(out)


def unwrap_module_name(name: str) -> tuple[str, int]:
    """``(module, depth)``: a saved module name without PEFT's nested ``.base_layer`` segments, and how many
    there were (``mlp.experts.base_layer`` -> ``("mlp.experts", 1)``)."""
    depth = 0
    while name.endswith(_BASE_LAYER):
        name, depth = name[: -len(_BASE_LAYER)], depth + 1
    return name, depth


class _Lora:
    """The LoRA factors of one module (or, for ``target_parameters``, of one wrapped parameter)."""

    __slots__ = ("module", "a_key", "b_key", "embedding", "r", "alpha", "scale", "transpose", "param",
                 "unwrapped", "depth", "magnitude", "wrapped", "experts", "swap", "ranked")

    def __init__(self, module: str):
        self.module = module
        self.a_key: str | None = None
        self.b_key: str | None = None
        self.embedding = False
        self.r = 0
        self.alpha = 0.0
        self.scale = 1.0
        self.transpose = False
        self.param: str | None = None
        self.unwrapped, self.depth = unwrap_module_name(module)
        self.magnitude: str | None = None  # DoRA: saved key of the magnitude vector
        self.wrapped = False  # LoRA on a bare parameter (PEFT ParamWrapper)
        self.experts = 1  # ParamWrapper: experts of a 3-D parameter (1 for 2-D)
        self.swap = True  # 3-D ParamWrapper: expert ΔW stored (out, in) (else (in, out))
        self.ranked = False  # r / alpha / scale resolved


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily, exposing exact per-parameter task vectors.

    Attributes: ``path``, ``name``, ``config`` (raw ``adapter_config.json``), ``weights_file``; after `bind`:
    ``mapping`` (adapter-side tensor name -> base parameter name), ``replacements`` (base parameter ->
    saved key of a full replacement tensor), ``unused_tensors`` (saved full tensors that fit no base
    parameter; logged with a warning).
    """

    kind = "lora"

    def __init__(self, path: Path, name: str, config: dict, weights_file: Path, tensors, shapes: dict):
        self.path = path
        self.name = name
        self.config = config
        self.weights_file = weights_file
        self._tensors = tensors  # safe_open handle or (mmap-ed) state dict
        self._shapes = shapes  # saved key -> shape
        self._loras: dict[str, _Lora] = {}  # adapter-side module -> factors
        self._full: dict[str, str] = {}  # adapter-side tensor name -> saved key
        self._tokens: dict[str, str] = {}  # adapter-side module -> saved key of trainable token rows
        self.mapping: dict[str, str] = {}
        self.replacements: dict[str, str] = {}
        self.unused_tensors: list[str] = []
        self._by_param: dict[str, list[_Lora]] = {}
        self._token_params: dict[str, tuple[str, list[int]]] = {}
        self._bound = False
        self._parse_keys()

    # ---------------------------------------------------------------------------------------------------
    # loading
    # ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "LoraAdapter":
        path = Path(path)
        name = name or path.name
        cfg_file = path / ADAPTER_CONFIG
        if not path.is_dir():
            raise AdapterError(f"adapter {name}: directory {path} does not exist")
        if not cfg_file.is_file():
            raise AdapterError(f"adapter {name}: missing {cfg_file}")
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            msg = first_line(exc)
            raise AdapterError(f"adapter {name}: cannot parse {cfg_file}: {msg}") from None
        cls._check_config(name, cfg_file, config)
        safe, binf = path / ADAPTER_SAFE, path / ADAPTER_BIN
        if safe.is_file():
            handle, header = open_safetensors(safe, AdapterError)
            shapes = {k: tuple(int(s) for s in v["shape"]) for k, v in header.items()}
            tensors, weights_file = handle, safe
        elif binf.is_file():
            tensors = load_torch_file(binf, AdapterError)
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            weights_file = binf
        else:
            raise AdapterError(f"adapter {name}: no weights in {path} (expected {ADAPTER_SAFE} or {ADAPTER_BIN})")
        if not shapes:
            raise AdapterError(f"adapter {name}: weights file {weights_file} holds no tensors")
        return cls(path, name, config, weights_file, tensors, shapes)

    @staticmethod
    def _check_config(name: str, cfg_file: Path, config: dict) -> None:
        peft_type = config.get("peft_type")
        if peft_type is None and not ("r" in config and "lora_alpha" in config):
            raise AdapterError(f"adapter {name}: {cfg_file} has no peft_type; only LoRA adapters are supported")
        if peft_type is not None and str(peft_type).upper() != "LORA":
            raise AdapterError(
                f"adapter {name}: {cfg_file} is a {peft_type} adapter; only LoRA adapters (peft_type LORA) "
                "are supported"
            )
        for field, label in _VARIANT_FIELDS.items():
            if config.get(field):
                raise AdapterError(
                    f"adapter {name}: {label} in {cfg_file} is not supported (its merged weights are not "
                    "base + scale·B·A)"
                )
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
            raise AdapterError(
                f"adapter {name}: init_lora_weights={init!r} in {cfg_file} modifies the base weights; convert it "
                "to a plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))"
            )
        try:
            r = int(config.get("r", 8))
            float(config.get("lora_alpha", 8))
        except (TypeError, ValueError):
            raise AdapterError(f"adapter {name}: bad r or lora_alpha in {cfg_file}") from None
        if r <= 0:
            raise AdapterError(f"adapter {name}: r={r} in {cfg_file} must be positive")

    def _parse_keys(self) -> None:
        cfg = self.config
        dora = bool(cfg.get("use_dora", False))
        for key in self._shapes:
            k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = _LORA_RE.match(k)
            if m:
                if m["param"] == "bias":
                    raise AdapterError(
                        f"adapter {self.name}: LoRA bias tensor '{key}' in {self.weights_file} "
                        "(lora_bias) is not supported"
                    )
                lo = self._loras.setdefault(m["mod"], _Lora(m["mod"]))
                setattr(lo, "a_key" if m["kind"] == "lora_A" else "b_key", key)
                continue
            m = _EMB_RE.match(k)
            if m:
                lo = self._loras.setdefault(m["mod"], _Lora(m["mod"]))
                lo.embedding = True
                setattr(lo, "a_key" if m["kind"] == "lora_embedding_A" else "b_key", key)
                continue
            m = _TOKENS_RE.match(k)
            if m:
                self._tokens[m["mod"]] = key
                continue
            m = _MAG_RE.match(k)
            if m:
                if not dora:
                    raise AdapterError(
                        f"adapter {self.name}: DoRA tensor '{key}' in {self.weights_file} but use_dora is not set "
                        f"in {self.path / ADAPTER_CONFIG}"
                    )
                self._loras.setdefault(m["mod"], _Lora(m["mod"])).magnitude = key
                continue
            if _LORA_MARK_RE.search(k):
                raise AdapterError(
                    f"adapter {self.name}: unsupported adapter tensor '{key}' in {self.weights_file}"
                )
            self._full[_strip_adapter_name(k)] = key
        for mod, lo in self._loras.items():
            if lo.a_key is None or lo.b_key is None:
                missing = "A" if lo.a_key is None else "B"
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' has no lora_{missing} tensor in {self.weights_file}"
                )
            if dora and lo.magnitude is None:
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' has no DoRA magnitude vector (lora_magnitude_vector) in "
                    f"{self.weights_file} although use_dora is set"
                )
            a_shape, b_shape = self._shapes[lo.a_key], self._shapes[lo.b_key]
            if len(a_shape) < 2 or len(b_shape) < 2:
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' has malformed factors A{shape_str(a_shape)}, "
                    f"B{shape_str(b_shape)} in {self.weights_file}"
                )
            if lo.depth == 0 and not self._may_wrap(lo.unwrapped):
                self._set_rank(lo, mod, 1)  # target_parameters: checked in bind, once the experts are known

    def _target_parameters(self) -> list[str]:
        return [str(t) for t in (self.config.get("target_parameters") or [])]

    def _may_wrap(self, module: str) -> bool:
        """Whether a ``target_parameters`` entry can name a parameter of ``module`` (PEFT's rule: the
        parameter's full name is the entry or ends with ``.<entry>``)."""
        for t in self._target_parameters():
            t_mod = t.rpartition(".")[0]
            if not t_mod or module == t_mod or module.endswith("." + t_mod):
                return True
        return False

    def _wrapped_candidates(self, module: str) -> list[str]:
        """Full names ``<module>.<param>`` that ``target_parameters`` targets (PEFT's matching)."""
        out = []
        for t in self._target_parameters():
            name = f"{module}.{t.rpartition('.')[2]}"
            if (name == t or name.endswith("." + t)) and name not in out:
                out.append(name)
        return out

    def _set_rank(self, lo: _Lora, pattern_name: str, experts: int) -> None:
        """r, lora_alpha and the scale of ``lo`` from the config (patterns matched against ``pattern_name``);
        checks that the factors hold ``experts`` × r ranks."""
        cfg = self.config
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), pattern_name), int(cfg.get("r", 8))))
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), pattern_name),
                                        float(cfg.get("lora_alpha", 8))))
        a_shape, b_shape = self._shapes[lo.a_key], self._shapes[lo.b_key]
        rank_a, rank_b = a_shape[0], b_shape[1]
        if rank_a != rank_b or rank_a != r * experts:
            per = f" × {experts} experts" if experts > 1 else ""
            raise AdapterError(
                f"adapter {self.name}: module '{lo.module}' has factors A{shape_str(a_shape)}, B{shape_str(b_shape)} "
                f"but the config gives rank r={r}{per} ({self.path / ADAPTER_CONFIG})"
            )
        lo.r, lo.alpha, lo.ranked = r, alpha, True
        lo.scale = alpha / math.sqrt(r) if bool(cfg.get("use_rslora", False)) else alpha / r

    # ---------------------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------------------
    def _get(self, key: str, device=None) -> torch.Tensor:
        if isinstance(self._tensors, dict):
            return self._tensors[key].to(device=device, copy=True).to(dtype=torch.float32)
        try:
            t = self._tensors.get_tensor(key)
        except Exception as exc:
            msg = first_line(exc)
            raise AdapterError(f"adapter {self.name}: cannot read '{key}' from {self.weights_file}: {msg}") from None
        return t.to(device=device).to(dtype=torch.float32)  # transfer the stored bytes, cast on the device

    def module_names(self) -> list[str]:
        """Names of the modules carrying LoRA factors, as in the base model that trained the adapter
        (``base_model.model.`` and adapter names stripped), e.g. ``model.layers.0.self_attn.q_proj``; a module
        whose bare parameters carry LoRAs (``target_parameters``) is listed once."""
        return list(dict.fromkeys(lo.unwrapped for lo in self._loras.values()))

    # ---------------------------------------------------------------------------------------------------
    # binding to a base model
    # ---------------------------------------------------------------------------------------------------
    def bind(self, base_param_shapes: dict[str, tuple]) -> None:
        """Map the adapter onto the base model's parameter names and check every shape.

        Raises `AdapterError` when no module is in common with the base, when a LoRA module has no base
        parameter, or when a ΔW does not fit its base parameter. Saved full tensors that fit no base
        parameter are listed in ``unused_tensors`` and logged (an error for bias tensors).
        """
        shapes = {k: tuple(int(s) for s in v) for k, v in base_param_shapes.items()}
        for lo in self._loras.values():
            lo.param, lo.wrapped, lo.experts, lo.swap, lo.transpose = None, False, 1, True, False
        groups: dict[str, list[_Lora]] = {}  # module without nested ".base_layer" -> its LoRAs
        for lo in self._loras.values():
            groups.setdefault(lo.unwrapped, []).append(lo)
        candidates = {m: self._wrapped_candidates(m) for m in groups if self._may_wrap(m)}
        lora_src = {f"{mod}.weight": mod for mod, lo in self._loras.items() if lo.depth == 0}
        token_src = {f"{mod}.weight": mod for mod in self._tokens}
        wrap_src = [c for cs in candidates.values() for c in cs]
        src = list(lora_src) + [c for c in wrap_src if c not in lora_src] + list(self._full)
        src += [s for s in token_src if s not in lora_src]
        mapping = match_names(src, shapes)
        if not mapping:
            raise AdapterError(
                f"adapter {self.name} ({self.path}): no module in common with the base model (adapter modules "
                f"e.g. {name_summary(self.module_names() or list(self._full), 3)}; base parameters e.g. "
                f"{name_summary(list(shapes), 3)})"
            )
        wrapped = self._bind_wrapped(groups, candidates, mapping, shapes)
        lora_src = {s: mod for s, mod in lora_src.items() if self._loras[mod].unwrapped not in wrapped}
        for mod in lora_src.values():
            if not self._loras[mod].ranked:
                self._set_rank(self._loras[mod], mod, 1)
        for s, mod in lora_src.items():
            if s not in mapping and (mod == "lm_head" or mod.endswith(".lm_head")):
                tied = self._tied_embedding(mod, shapes)
                if tied is not None:
                    mapping[s] = tied
                    logger.info("adapter %s: %s is not a base parameter (tied head): its LoRA goes to %s",
                                self.name, s, tied)
        missing = [lora_src[s] for s in lora_src if s not in mapping]
        if missing:
            raise AdapterError(
                f"adapter {self.name}: module '{missing[0]}' has no parameter in the base model "
                f"({len(lora_src) - len(missing)} of {len(lora_src)} LoRA modules found; wrong base model?)"
            )
        self._resolve_orientation(mapping, lora_src, shapes)

        replacements: dict[str, str] = {}
        unused: list[str] = []
        bias_mode = str(self.config.get("bias", "none"))
        for tname, key in self._full.items():
            target = mapping.get(tname)
            owner = self._base_layer_owner(key)
            if owner is not None:  # "<lora module>.base_layer.<param>": follows its LoRA module
                lo = self._loras[owner]
                target = lo.param[: -len("weight")] + tname[len(owner) + 1:]
                target = target if target in shapes else None
            if target is not None and shapes[target] == self._shapes[key]:
                replacements[target] = key
                continue
            if tname.endswith(".bias") and bias_mode != "none":
                where = (f"base parameter '{target}' has shape {shape_str(shapes[target])}" if target
                         else "no base parameter of that name")
                raise AdapterError(
                    f"adapter {self.name}: bias tensor '{key}' {shape_str(self._shapes[key])} in "
                    f"{self.weights_file} does not fit the base model ({where})"
                )
            unused.append(key)
        token_params: dict[str, tuple[str, list[int]]] = {}
        for s, mod in token_src.items():
            target = mapping.get(s)
            key = self._tokens[mod]
            if target is None:
                raise AdapterError(
                    f"adapter {self.name}: trainable tokens of module '{mod}' ({key}) have no parameter in "
                    "the base model"
                )
            idx = self._token_indices(mod)
            ts, bs = self._shapes[key], shapes[target]
            if len(idx) != ts[0] or ts[1:] != bs[1:] or (idx and (max(idx) >= bs[0] or min(idx) < 0)):
                raise AdapterError(
                    f"adapter {self.name}: trainable tokens '{key}' {shape_str(ts)} for indices {idx[:8]} "
                    f"do not fit base parameter '{target}' {shape_str(bs)}"
                )
            token_params[target] = (key, idx)
        if unused:
            logger.warning(
                "adapter %s: %d saved tensor(s) match no base parameter of the same name and shape and are "
                "ignored: %s", self.name, len(unused),
                name_summary([f"{k} {shape_str(self._shapes[k])}" for k in unused]))
        self.mapping = mapping
        self.replacements = replacements
        self.unused_tensors = unused
        self._token_params = token_params
        by_param: dict[str, list[_Lora]] = {}
        for lo in self._loras.values():
            by_param.setdefault(lo.param, []).append(lo)
        self._check_dora(by_param, replacements, token_params, shapes)
        self._by_param = by_param
        self._bound = True

    def _base_layer_owner(self, key: str) -> str | None:
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".base_layer." not in k:
            return None
        mod = _strip_adapter_name(k.rsplit(".base_layer.", 1)[0])
        lo = self._loras.get(mod)
        return mod if lo is not None and lo.param is not None and not lo.wrapped else None

    def _bind_wrapped(self, groups: dict, candidates: dict, mapping: dict, shapes: dict) -> list[str]:
        """Bind the LoRAs on bare parameters (``target_parameters``); returns the modules that hold them.

        PEFT wraps a module's targeted parameters in the order of its ``named_parameters`` (the base's
        order here), each wrapper around the previous one, so the first is the innermost (deepest
        ``.base_layer``). Shapes confirm the assignment; when the order does not fit, the one assignment
        that does is taken."""
        order = {n: i for i, n in enumerate(shapes)}
        wrapped: list[str] = []
        for module, los in groups.items():
            targeted = sorted((c for c in candidates.get(module, ()) if c in mapping), key=lambda c: order[mapping[c]])
            if not targeted and all(lo.depth == 0 for lo in los):
                continue  # an ordinary LoRA module
            wrapped.append(module)
            depths = sorted(lo.depth for lo in los)
            if depths != list(range(len(targeted))):
                found = name_summary([mapping[c] for c in targeted], 3) if targeted else "none"
                raise AdapterError(
                    f"adapter {self.name}: module '{module}' has {len(los)} LoRA(s) on bare parameters but "
                    f"target_parameters names {len(targeted)} of its base parameters (found: {found}; wrong base "
                    "model?)"
                )
            by_depth = sorted(los, key=lambda lo: -lo.depth)  # innermost first
            fits = [[self._wrapper_layouts(lo, shapes[mapping[c]]) for c in targeted] for lo in by_depth]
            perms = [p for p in itertools.permutations(range(len(targeted)))
                     if all(fits[i][j] for i, j in enumerate(p))]
            identity = tuple(range(len(targeted)))
            if identity in perms or len(perms) == 1:
                perm = identity if identity in perms else perms[0]
            else:
                i = next(i for i in range(len(targeted)) if not fits[i][i])
                lo, c = by_depth[i], targeted[i]
                raise AdapterError(
                    f"adapter {self.name}: LoRA on parameter '{c}' has factors A{shape_str(self._shapes[lo.a_key])}, "
                    f"B{shape_str(self._shapes[lo.b_key])} that do not fit base parameter '{mapping[c]}' "
                    f"{shape_str(shapes[mapping[c]])}"
                )
            for i, j in enumerate(perm):
                lo, c = by_depth[i], targeted[j]
                shape = shapes[mapping[c]]
                lo.param, lo.wrapped = mapping[c], True
                lo.experts = shape[0] if len(shape) == 3 else 1
                layouts = fits[i][j]
                lo.swap = next(iter(layouts)) if len(layouts) == 1 else None
                self._set_rank(lo, c, lo.experts)
                if lo.magnitude is not None:
                    raise AdapterError(
                        f"adapter {self.name}: DoRA on the bare parameter '{c}' in {self.weights_file} is not "
                        "supported"
                    )
        self._resolve_expert_layouts([lo for m in wrapped for lo in groups[m]])
        return wrapped

    def _wrapper_layouts(self, lo: _Lora, shape: tuple) -> set[bool]:
        """How LoRA factors ``lo`` fit a parameter of ``shape`` under PEFT's ParamWrapper: for a 3-D
        parameter of several experts, the layouts that fit (True: experts stored (out, in), False: (in, out));
        ``{True}`` when the factors fit otherwise; empty when they do not fit."""
        a, b = self._shapes[lo.a_key], self._shapes[lo.b_key]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or len(shape) not in (2, 3):
            return set()
        experts = shape[0] if len(shape) == 3 else 1
        if a[0] % experts:
            return set()
        if experts == 1:  # PEFT merges s·B·A as one (out, in) matrix
            return {True} if (b[0], a[1]) == tuple(shape[-2:]) else set()
        out = set()
        if (b[0], a[1]) == (shape[1], shape[2]):
            out.add(True)
        if (a[1], b[0]) == (shape[1], shape[2]):
            out.add(False)
        return out

    def _resolve_expert_layouts(self, los: list[_Lora]) -> None:
        """Square experts fit both layouts: take the one the module's other parameters show (one
        transformers module class has one layout), else the one every other expert parameter shows."""
        known = [lo for lo in los if lo.swap is not None]
        for lo in los:
            if lo.swap is not None:
                continue
            siblings = {k.swap for k in known if k.unwrapped == lo.unwrapped}
            seen = siblings or {k.swap for k in known if k.experts > 1}
            if len(seen) != 1:
                raise AdapterError(
                    f"adapter {self.name}: cannot tell whether base parameter '{lo.param}' stores its experts as "
                    "(experts, out, in) or (experts, in, out): its experts are square and no other LoRA parameter "
                    "of the adapter shows the layout"
                )
            lo.swap = next(iter(seen))

    def _check_dora(self, by_param: dict, replacements: dict, token_params: dict, shapes: dict) -> None:
        """A DoRA module must be the only LoRA on its parameter (its ΔW depends on the weight it is merged
        into; a saved ``base_layer`` weight is that weight) and its magnitude vector must have one entry per
        output feature."""
        for param, los in by_param.items():
            dora = [lo for lo in los if lo.magnitude is not None]
            if not dora:
                continue
            lo = dora[0]
            if len(los) > 1 or param in token_params:
                raise AdapterError(
                    f"adapter {self.name}: DoRA module '{lo.module}' shares base parameter '{param}' with another "
                    "LoRA or trainable tokens, which is not supported"
                )
            shape = shapes[param]
            out = shape[1] if lo.transpose else shape[0]
            mag = self._shapes[lo.magnitude]  # (out,); (1, out, 1, …) for convolutions
            if math.prod(mag) != out or sum(d != 1 for d in mag) > 1:
                raise AdapterError(
                    f"adapter {self.name}: DoRA magnitude '{lo.magnitude}' {shape_str(mag)} does not fit base "
                    f"parameter '{param}' {shape_str(shape)} ({out} output features)"
                )

    def _tied_embedding(self, mod: str, shapes: dict) -> str | None:
        """The input embedding a LoRA on an absent (tied) output head merges into, as PEFT does."""
        lo = self._loras[mod]
        dw = (self._shapes[lo.b_key][0], self._shapes[lo.a_key][1])
        suffixes = tuple("." + c for c in EMBED_CANDIDATES)
        cands = [n for n in shapes if (n in EMBED_CANDIDATES or n.endswith(suffixes)) and shapes[n] == dw]
        return cands[0] if len(cands) == 1 else None

    def _token_indices(self, mod: str) -> list[int]:
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):
            for k, v in spec.items():
                if mod == k or mod.endswith("." + k) or re.fullmatch(rf"(.*\.)?({k})", mod):
                    return [int(i) for i in v]
            if len(spec) == 1:
                return [int(i) for i in next(iter(spec.values()))]
            raise AdapterError(
                f"adapter {self.name}: no trainable_token_indices entry for module '{mod}' in "
                f"{self.path / ADAPTER_CONFIG}"
            )
        if isinstance(spec, list):
            return [int(i) for i in spec]
        raise AdapterError(
            f"adapter {self.name}: trainable tokens saved for '{mod}' but trainable_token_indices is missing "
            f"from {self.path / ADAPTER_CONFIG}"
        )

    def _resolve_orientation(self, mapping: dict, lora_src: dict, shapes: dict) -> None:
        """Decide per module whether ΔW is stored transposed; check that it fits its base parameter."""
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        square: list[_Lora] = []
        seen_t, seen_n = 0, 0
        for s, mod in lora_src.items():
            lo = self._loras[mod]
            lo.param = mapping[s]
            a, b = self._shapes[lo.a_key], self._shapes[lo.b_key]
            base = shapes[lo.param]
            if lo.embedding:  # A: (r, num_embeddings), B: (dim, r); ΔW = (B A)^T
                ok = base == (a[1], b[0]) and len(a) == len(b) == 2
                lo.transpose = True
                dw = (a[1], b[0])
            elif len(a) == 2 and len(b) == 2:
                dw = (b[0], a[1])
                fits_n, fits_t = base == dw, base == (a[1], b[0])
                ok = fits_n or fits_t
                if fits_n and fits_t:
                    square.append(lo)
                elif fits_t:
                    lo.transpose, seen_t = True, seen_t + 1
                elif fits_n:
                    seen_n += 1
            else:  # convolution: A (r, in, *k), B (out, r, 1...)
                dw = (b[0],) + tuple(a[1:])
                ok = base == dw and all(x == 1 for x in b[2:])
            if not ok:
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' gives ΔW of shape {shape_str(dw)} (A{shape_str(a)}, "
                    f"B{shape_str(b)}) but base parameter '{lo.param}' has shape {shape_str(base)}"
                )
        for lo in square:
            # shapes cannot tell: follow the config, unless every other module shows the opposite layout
            # (PEFT itself corrects fan_in_fan_out per layer type: Conv1D -> True, Linear -> False)
            if fan_in_fan_out:
                lo.transpose = not (seen_n and not seen_t)
            else:
                lo.transpose = bool(seen_t and not seen_n)

    # ---------------------------------------------------------------------------------------------------
    # task vectors
    # ---------------------------------------------------------------------------------------------------
    def _check_bound(self) -> None:
        if not self._bound:
            raise RuntimeError(f"adapter {self.name}: call bind(base_param_shapes) first")

    def param_names(self) -> set[str]:
        """Base parameter names this adapter changes."""
        self._check_bound()
        return set(self._by_param) | set(self.replacements) | set(self._token_params)

    def low_rank_only(self, param_name: str) -> bool:
        """Whether the task vector of ``param_name`` is exactly its LoRA factors' product (no saved full
        tensor or trained token rows beside them; not DoRA, not a LoRA on a bare parameter)."""
        self._check_bound()
        return (param_name in self._by_param and param_name not in self.replacements
                and param_name not in self._token_params and self._plain(param_name))

    def _plain(self, param_name: str) -> bool:
        """Whether every LoRA on ``param_name`` is a plain s·B·A of one module (no DoRA, no ParamWrapper)."""
        return all(lo.magnitude is None and not lo.wrapped for lo in self._by_param.get(param_name, ()))

    def is_variant(self, param_name: str) -> bool:
        """Whether ``param_name`` carries a DoRA module or a LoRA on a bare parameter: its task vector is
        only available whole, through `delta`."""
        self._check_bound()
        return param_name in self._by_param and not self._plain(param_name)

    def factors(self, param_name: str, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B·s, A)`` in float32 in the base weight's orientation, so that ``ΔW_lora == B·s @ A``
        (for a transposed layout: ``(Aᵀ·s, Bᵀ)``; for convolutions the product is ΔW flattened to
        ``(out, -1)``). None when the parameter has no LoRA factors, and for DoRA modules and LoRAs on bare
        parameters (``target_parameters``), whose ΔW is no such product. Only the low-rank part: a parameter in
        ``replacements`` also has a full-tensor term in `delta`."""
        self._check_bound()
        los = self._by_param.get(param_name)
        if not los or not self._plain(param_name):
            return None
        pairs = []
        for lo in los:
            a, b = self._get(lo.a_key, device), self._get(lo.b_key, device)
            if a.dim() > 2:
                pairs.append((b.reshape(b.shape[0], -1) * lo.scale, a.reshape(a.shape[0], -1)))
            elif lo.transpose:
                pairs.append((a.T * lo.scale, b.T))
            else:
                pairs.append((b * lo.scale, a))
        if len(pairs) == 1:
            return pairs[0][0].contiguous(), pairs[0][1].contiguous()
        # several LoRAs on one parameter (e.g. embedding + tied head): stack the ranks
        return torch.cat([p[0] for p in pairs], dim=1), torch.cat([p[1] for p in pairs], dim=0)

    def _lora_delta(self, lo: _Lora, base: torch.Tensor) -> torch.Tensor:
        return self._product(lo, base) if lo.magnitude is None else self._dora_delta(lo, base)

    def _product(self, lo: _Lora, base: torch.Tensor) -> torch.Tensor:
        """s·B·A of ``lo`` in the layout of ``base`` (float32 on its device)."""
        dev = base.device
        a, b = self._get(lo.a_key, dev), self._get(lo.b_key, dev)
        if lo.wrapped and lo.experts > 1:
            # PEFT ParamWrapper: A (E·r, in) is expert-major, B (out, r·E) rank-major
            e = lo.experts
            a3 = a.reshape(e, -1, a.shape[1])
            b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
            if lo.swap:
                d = torch.bmm(b3, a3)  # (E, out, in)
            else:  # (E, in, out), computed in that layout (no transposed copy of an expert stack)
                d = torch.bmm(a3.transpose(1, 2), b3.transpose(1, 2))
            return d.mul_(lo.scale)
        if lo.wrapped:
            return (b @ a).reshape(base.shape).mul_(lo.scale)
        if a.dim() > 2:
            d = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base.shape)
        elif lo.transpose:
            d = a.T @ b.T
        else:
            d = b @ a
        return d.mul_(lo.scale)

    def _dora_delta(self, lo: _Lora, base: torch.Tensor) -> torch.Tensor:
        """DoRA: m ⊙ V/‖V‖ − W with V = W + s·B·A, the norm over each output feature (PEFT's merge)."""
        w = base.detach().float()
        v = self._product(lo, base).add_(w)
        m = self._get(lo.magnitude, base.device).reshape(-1)
        if v.dim() == 2:
            dim = 0 if lo.transpose else 1  # stored (in, out): Conv1D / fan_in_fan_out, embeddings
            norm = torch.linalg.norm(v, dim=dim, keepdim=True)
            m = m.view(1, -1) if lo.transpose else m.view(-1, 1)
        else:  # convolution: over everything but the output channel
            norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True)
            m = m.view((-1,) + (1,) * (v.dim() - 1))
        return v.mul_(m / norm).sub_(w)

    def delta(self, param_name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The exact task vector for ``param_name`` in float32 on ``base.device``; None when untouched."""
        self._check_bound()
        out = None
        key = self.replacements.get(param_name)
        if key is not None:
            out = self._get(key, base.device) - base.detach().float()
        tok = self._token_params.get(param_name)
        if tok is not None:
            tkey, idx = tok
            if out is None:
                out = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
            index = torch.tensor(idx, dtype=torch.long, device=base.device)
            rows = self._get(tkey, base.device) - base.detach().index_select(0, index).float()
            out.index_copy_(0, index, rows)
        for lo in self._by_param.get(param_name, ()):
            if lo.magnitude is not None and out is not None:  # DoRA onto the saved weight that replaces the base
                d = self._dora_delta(lo, base.detach().float() + out)
            else:
                d = self._lora_delta(lo, base)
            out = d if out is None else out.add_(d)
        return out

    def in_memory(self, device=None) -> "LoraAdapter":
        """A bound copy whose saved tensors are held in float32 on ``device`` (the search caches its
        experts this way): `delta` and `factors` then give the same values without reading the file."""
        import copy

        self._check_bound()
        held = copy.copy(self)
        held._tensors = {key: self._get(key, device) for key in self._shapes}
        return held

    def close(self) -> None:
        self._tensors = None

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, {len(self._loras)} LoRA modules, {len(self._full)} full tensors)"
