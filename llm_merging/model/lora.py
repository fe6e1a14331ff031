"""Exact task vectors of PEFT LoRA adapters, one base parameter at a time.

A LoRA adapter changes a base weight W by ``ΔW = s · B · A`` with ``s = lora_alpha / r`` (``lora_alpha / √r``
with ``use_rslora``), where ``r`` and ``lora_alpha`` may be overridden per module by ``rank_pattern`` /
``alpha_pattern`` (PEFT's matching: a pattern key matches a module name when the name is the key or ends
with ``.<key>``, the key being a regular expression; the first matching key wins). ``ΔW`` is transposed for
layers stored as (in, out) (GPT-2's Conv1D, ``fan_in_fan_out``) and for embeddings. Full tensors saved next to
the factors (``modules_to_save``, a classification head, an embedding's ``base_layer``) replace the base
tensor, so their task vector is ``saved - base``; ``trainable_token_indices`` replace single rows.

`LoraAdapter` follows the expert protocol shared with `llm_merging.model.checkpoint.FullExpert`:
``name``, ``bind(shapes)``, ``param_names()``, ``delta(param_name, base)``.
"""
from __future__ import annotations

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
_LORA_MARK_RE = re.compile(r"(^|\.)lora_[A-Za-z_]*(\.|$)")

# LoRA variants whose merged weight is not base + s·B·A (or that cannot be merged at all)
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "lora_bias=true",
    "use_qalora": "QALoRA (use_qalora=true)",
    "velora_config": "VeLoRA (velora_config)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
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


class _Lora:
    """The LoRA factors of one module."""

    __slots__ = ("module", "a_key", "b_key", "embedding", "r", "alpha", "scale", "transpose", "param")

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
        r0 = int(cfg.get("r", 8))
        alpha0 = float(cfg.get("lora_alpha", 8))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
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
            if "lora_magnitude_vector" in k:
                raise AdapterError(
                    f"adapter {self.name}: DoRA tensor '{key}' in {self.weights_file} is not supported"
                )
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
            a_shape, b_shape = self._shapes[lo.a_key], self._shapes[lo.b_key]
            if len(a_shape) < 2 or len(b_shape) < 2:
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' has malformed factors A{shape_str(a_shape)}, "
                    f"B{shape_str(b_shape)} in {self.weights_file}"
                )
            rank_a = a_shape[0]
            rank_b = b_shape[1]
            r = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), mod), r0))
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), mod), alpha0))
            if rank_a != rank_b or rank_a != r:
                raise AdapterError(
                    f"adapter {self.name}: module '{mod}' has factors A{shape_str(a_shape)}, B{shape_str(b_shape)} "
                    f"but the config gives rank r={r} ({self.path / ADAPTER_CONFIG})"
                )
            lo.r, lo.alpha = r, alpha
            lo.scale = alpha / math.sqrt(r) if rslora else alpha / r

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
        (``base_model.model.`` and adapter names stripped), e.g. ``model.layers.0.self_attn.q_proj``."""
        return list(self._loras)

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
        lora_src = {f"{mod}.weight": mod for mod in self._loras}
        token_src = {f"{mod}.weight": mod for mod in self._tokens}
        src = list(lora_src) + list(self._full) + [s for s in token_src if s not in lora_src]
        mapping = match_names(src, shapes)
        if not mapping:
            raise AdapterError(
                f"adapter {self.name} ({self.path}): no module in common with the base model (adapter modules "
                f"e.g. {name_summary(self.module_names() or list(self._full), 3)}; base parameters e.g. "
                f"{name_summary(list(shapes), 3)})"
            )
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
        self._by_param = by_param
        self._bound = True

    def _base_layer_owner(self, key: str) -> str | None:
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".base_layer." not in k:
            return None
        mod = _strip_adapter_name(k.rsplit(".base_layer.", 1)[0])
        return mod if mod in self._loras and self._loras[mod].param is not None else None

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
        tensor or trained token rows beside them)."""
        self._check_bound()
        return (param_name in self._by_param and param_name not in self.replacements
                and param_name not in self._token_params)

    def factors(self, param_name: str, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B·s, A)`` in float32 in the base weight's orientation, so that ``ΔW_lora == B·s @ A``
        (for a transposed layout: ``(Aᵀ·s, Bᵀ)``; for convolutions the product is ΔW flattened to
        ``(out, -1)``). None when the parameter has no LoRA factors. Only the low-rank part: a parameter in
        ``replacements`` also has a full-tensor term in `delta`."""
        self._check_bound()
        los = self._by_param.get(param_name)
        if not los:
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
        dev = base.device
        a, b = self._get(lo.a_key, dev), self._get(lo.b_key, dev)
        if a.dim() > 2:
            d = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(base.shape)
        elif lo.transpose:
            d = a.T @ b.T
        else:
            d = b @ a
        return d.mul_(lo.scale)

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
