"""Building a mixture-of-experts model out of dense experts, from mergekit-moe 0.1.5's YAML.

Each expert's MLP becomes one routed expert of every layer; attention, norms and embeddings come from
``base_model``; each layer's router (``gate.weight``) gets one row per expert, computed as mergekit-moe
computes it (``gate_mode``):

* ``hidden`` (default; also ``hidden_avg``): the base model's hidden states at the input of every layer for
  the expert's ``positive_prompts`` (the last token of each prompt, or the mean over positions with
  ``hidden_avg``), averaged over the prompts, minus the same for its ``negative_prompts``, normalised to unit
  length, per layer; computed in bfloat16 as mergekit does;
* ``cheap_embed``: the prompts' token embeddings summed over tokens and prompts and normalised (the same row
  for every layer), minus the negative prompts' likewise, normalised again;
* ``random``: standard normal rows; ``uniform_random``: uniform in ±1/√hidden (``nn.Linear``'s default);
  both from a seeded generator.

The output is a transformers 5 directory (the tensor names ``save_pretrained`` writes, planned from the
base's safetensors headers: :func:`moe_layout`) written tensor by tensor into preallocated safetensors shards
(:class:`~llm_merging.model.save.ShardWriter`) by a second thread while the main one loads transformers,
writes the config and tokenizer and computes the gates; tensors whose bytes stay as they are (same dtype, no
LoRA, noise or scale) are copied file to file by the kernel, the others computed one at a time; the routers go
in last. At most one input tensor is in this process's memory at a time (plus the base model for ``hidden``
gates). Every check on the YAML, the models' configs, tensors and the tokenizer runs before any weight is read
(the base's transformers config and the loaded tokenizer are checked again while the weights are written); the
directory (new or empty, none of the inputs) is written under a temporary name and renamed into place, or
removed on failure.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_merging.core.errors import ConfigError, LLMMergingError, first_line
from llm_merging.core.io import (
    check_keys,
    check_new_dir,
    read_yaml_documents,
    remove_path,
    replace_path,
    temp_path,
)
from llm_merging.model.checkpoint import CheckpointReader, shape_str
from llm_merging.model.lora import LoraAdapter
from llm_merging.model.refs import ModelRef, hf_token, is_adapter_dir
from llm_merging.model.save import ShardWriter, model_card
from llm_merging.model.tokenizer_union import load_tokenizer

logger = logging.getLogger(__name__)

TOP_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
            "tokenizer_source"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
#: gate modes: mergekit-moe's four, and the two spellings of ``hidden`` its router accepts
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
#: mergekit's default when ``experts_per_token`` is absent
DEFAULT_EXPERTS_PER_TOKEN = 2


@dataclass(frozen=True)
class OutputKind:
    """An MoE output architecture: its key, mergekit-moe's name for it, the transformers model type and the
    dense model types and shared-expert counts it holds."""

    key: str
    mergekit_name: str
    model_type: str
    architecture: str
    inputs: tuple[str, ...]
    shared: tuple[int, int]  # (at least, at most) shared experts
    unavailable: str | None = None  # why it cannot be written here

    def describe(self) -> str:
        shared = ("no shared expert" if self.shared == (0, 0) else
                  "exactly one shared expert" if self.shared == (1, 1) else "at most one shared expert")
        status = f"not available: {self.unavailable}" if self.unavailable else self.architecture
        return (f"{self.key:<10} (mergekit: {self.mergekit_name!r}) from {'/'.join(self.inputs)} experts, "
                f"{shared}: {status}")


#: in mergekit-moe's order of preference (Mixtral first when several fit)
OUTPUT_KINDS: tuple[OutputKind, ...] = (
    OutputKind("mixtral", "Mixtral", "mixtral", "MixtralForCausalLM", ("llama", "mistral"), (0, 0)),
    OutputKind("deepseek", "DeepSeek MoE", "deepseek", "DeepseekForCausalLM", ("llama", "mistral"), (0, 1),
               unavailable="model type 'deepseek' (DeepSeek-MoE v1) is remote code that transformers does not "
                           "ship, so the output would not load with AutoModelForCausalLM"),
    OutputKind("qwen2_moe", "Qwen MoE", "qwen2_moe", "Qwen2MoeForCausalLM", ("llama", "mistral", "qwen2"), (1, 1)),
    OutputKind("qwen3_moe", "Qwen3 MoE", "qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), (0, 0)),
)


def list_kinds() -> list[str]:
    """One line per output architecture (``llm-merging moe --list-architectures``)."""
    return [k.describe() for k in OUTPUT_KINDS]


# ------------------------------------------------------------------------------------------------------
# the configuration
# ------------------------------------------------------------------------------------------------------
@dataclass
class ExpertSpec:
    """One expert of the YAML: ``source_model`` (``PATH`` or ``BASE+LORA``) and its gate prompts."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None
    where: str = ""  # e.g. experts[1]
    model_path: Path | None = None  # the dense model (resolved)
    lora_path: Path | None = None  # BASE+LORA: the adapter (resolved)


@dataclass
class MoEConfig:
    """mergekit-moe's ``MoEMergeConfig``, read from YAML and checked (types and values; no file opened)."""

    path: str
    base_model: str
    experts: list[ExpertSpec]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = DEFAULT_EXPERTS_PER_TOKEN
    shared_experts: list[ExpertSpec] = field(default_factory=list)
    architecture: str | None = None
    tokenizer_source: str | None = None
    text: str = ""  # the YAML as written (copied into the output)


def _err(path: str, where: str, text: str) -> ConfigError:
    return ConfigError(f"moe config {path}: {where}: {text}")


def _prompts(path: str, where: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise _err(path, where, "expected a list of prompt strings")
    return list(value)


def _number(path: str, where: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(path, where, f"expected a number, got {value!r}")
    return float(value)


def _model_text(path: str, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _err(path, where, f"expected a model path or hub id (or BASE+LORA), got {value!r}")
    return value.strip()


def _expert(path: str, where: str, obj: Any) -> ExpertSpec:
    if isinstance(obj, str):
        obj = {"source_model": obj}
    obj = check_keys(f"moe config {path}", where, obj, EXPERT_KEYS)
    if "source_model" not in obj:
        raise _err(path, f"{where}.source_model", "missing")
    return ExpertSpec(source_model=_model_text(path, f"{where}.source_model", obj["source_model"]),
                      positive_prompts=_prompts(path, f"{where}.positive_prompts", obj.get("positive_prompts")),
                      negative_prompts=_prompts(path, f"{where}.negative_prompts", obj.get("negative_prompts")),
                      noise_scale=_number(path, f"{where}.noise_scale", obj.get("noise_scale")),
                      residual_scale=_number(path, f"{where}.residual_scale", obj.get("residual_scale")),
                      where=where)


def load_moe_config(path: str | os.PathLike) -> MoEConfig:
    """Read a mergekit-moe YAML (one document) and check its keys and values; one-line ConfigErrors
    naming the file and the key. Nothing else is opened."""
    path = str(path)
    label = f"moe config {path}"
    docs = read_yaml_documents(path, label)
    if len(docs) != 1:
        raise ConfigError(f"{label}: expected one YAML document (a mapping with base_model and experts), "
                          f"found {len(docs)}")
    doc = check_keys(label, "", docs[0][1], TOP_KEYS)
    text = Path(path).read_text(encoding="utf-8")  # copied into the output as written
    if "base_model" not in doc:
        raise _err(path, "base_model", "missing")
    base = _model_text(path, "base_model", doc["base_model"])
    if "+" in base:
        raise _err(path, "base_model", "the base model cannot be BASE+LORA; give a dense model")
    experts = doc.get("experts")
    if not isinstance(experts, list) or not experts:
        raise _err(path, "experts", "expected a non-empty list of experts (each with source_model)")
    shared = doc.get("shared_experts") or []
    if not isinstance(shared, list):
        raise _err(path, "shared_experts", "expected a list of experts")
    gate_mode = doc.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise _err(path, "gate_mode", f"unknown gate mode {gate_mode!r} (known: {', '.join(GATE_MODES)})")
    dtype = doc.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _err(path, "dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    k = doc.get("experts_per_token", DEFAULT_EXPERTS_PER_TOKEN)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _err(path, "experts_per_token", f"expected a positive integer, got {k!r}")
    if k > len(experts):
        raise _err(path, "experts_per_token", f"{k} is more than the {len(experts)} experts")
    arch = doc.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch.strip()):
        raise _err(path, "architecture", f"expected a name, got {arch!r}")
    tok = doc.get("tokenizer_source")
    if tok is not None and (not isinstance(tok, str) or not tok.strip()):
        raise _err(path, "tokenizer_source", f"expected 'base' or a model path, got {tok!r}")
    cfg = MoEConfig(path=path, base_model=base, gate_mode=gate_mode, dtype=dtype, experts_per_token=k,
                    experts=[_expert(path, f"experts[{i}]", e) for i, e in enumerate(experts)],
                    shared_experts=[_expert(path, f"shared_experts[{i}]", e) for i, e in enumerate(shared)],
                    architecture=arch.strip() if arch else None, tokenizer_source=tok.strip() if tok else None,
                    text=text)
    if gate_mode in PROMPT_MODES:
        for e in cfg.experts:
            if not e.positive_prompts:
                raise _err(path, f"{e.where}.positive_prompts", f"gate_mode {gate_mode} computes each router row "
                                 "from the expert's prompts: give one or more (or gate_mode: random)")
        first = _prompt_key(cfg.experts[0])
        if len(cfg.experts) > 1 and all(_prompt_key(e) == first for e in cfg.experts[1:]):
            raise _err(path, "experts", "every expert has the same positive and negative prompts, so the router "
                                        "cannot tell them apart; give each expert prompts of its own")
        with_prompts = [bool(e.positive_prompts) for e in cfg.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            raise _err(path, "shared_experts", "give prompts to every shared expert or to none")
    return cfg


def _prompt_key(e: ExpertSpec) -> tuple:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


# ------------------------------------------------------------------------------------------------------
# gate math (pure functions)
# ------------------------------------------------------------------------------------------------------
def pool_hidden_states(hidden_states: Sequence[torch.Tensor], average: bool) -> torch.Tensor:
    """One vector per layer from a forward pass's ``hidden_states`` (embeddings, then each layer's output;
    the last, after the final layer, is dropped so that entry ``l`` is the input of layer ``l``): each
    prompt's last position (left padding puts every prompt's last token there) or, with ``average``, the
    mean over all positions (padding included, as mergekit does), then the mean over prompts.
    Returns ``(layers, hidden)`` in the states' dtype."""
    states = torch.stack(tuple(hidden_states)[:-1])  # (layers, prompts, positions, hidden)
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def cheap_embedding(embed: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    num_layers: int) -> torch.Tensor:
    """The prompts' token embeddings (float32) summed over the unmasked positions and the prompts,
    normalised to unit length, repeated for every layer: ``(layers, hidden)``."""
    h = embed.float()[input_ids]  # (prompts, positions, hidden): the rows a one-hot product picks
    summed = (h * attention_mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


def gate_rows(positive: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
    """An expert's router row per layer: ``positive - negative`` normalised to unit length per layer
    (``(layers, hidden)``; the arithmetic stays in the inputs' dtype)."""
    v = positive - negative if negative is not None else positive.clone()
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(num_layers: int, num_experts: int, hidden: int, *, seed: int, uniform: bool = False) -> torch.Tensor:
    """``(layers, experts, hidden)`` router rows: standard normal, or uniform in ±1/√hidden (``uniform``),
    from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    if uniform:
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((num_layers, num_experts, hidden), generator=gen) * 2 * scale - scale
    return torch.randn((num_layers, num_experts, hidden), generator=gen)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``, as
    mergekit warns): some experts will rarely be chosen there."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


# ------------------------------------------------------------------------------------------------------
# planning: every check before any weight is read
# ------------------------------------------------------------------------------------------------------
@dataclass
class MoEPlan:
    """A checked configuration: resolved models, the output kind, the base's dimensions (from its weights)
    and the output's tensors (their order decides which shard each goes to)."""

    config: MoEConfig
    kind: OutputKind
    base_path: Path
    base_json: dict  # the base's config.json as written
    layers: int
    hidden: int
    vocab: int  # embedding rows
    tied: bool  # the output ties lm_head to the embeddings (as the base does)
    out_dtype: torch.dtype
    tokenizer_path: Path
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]  # saved name -> (shape, dtype), sorted by name
    seed: int = 0
    device: str = "cpu"

    @property
    def gated(self) -> list[ExpertSpec]:
        """The experts that get a router row: routed experts, then shared experts that are gated."""
        shared = self.config.shared_experts if self.kind.key == "qwen2_moe" else []
        return list(self.config.experts) + list(shared)


def _resolve(cfg: MoEConfig, where: str, text: str) -> Path:
    try:
        return ModelRef.parse(text).resolve(hf_token())
    except LLMMergingError as exc:
        raise type(exc)(f"moe config {cfg.path}: {where}: {exc}") from None


def _read_config_json(cfg: MoEConfig, where: str, path: Path) -> dict:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as exc:
        raise _err(cfg.path, where, f"{path} has no readable config.json ({first_line(exc)})") from None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _kind_problem(kind: OutputKind, cfg: MoEConfig, model_type: str) -> tuple[str, str] | None:
    """(key, why) when ``kind`` cannot hold these experts, else None."""
    if kind.unavailable:
        return "architecture", f"{kind.mergekit_name} output: {kind.unavailable}"
    n = len(cfg.shared_experts)
    if not kind.shared[0] <= n <= kind.shared[1]:
        need = "no shared experts" if kind.shared[1] == 0 else "exactly one shared expert"
        return "shared_experts", f"{kind.mergekit_name} output takes {need}, the config has {n}"
    if model_type not in kind.inputs:
        return "base_model", f"{kind.mergekit_name} output is built from {'/'.join(kind.inputs)} models, not {model_type}"
    if kind.key == "qwen2_moe" and cfg.gate_mode in PROMPT_MODES and not cfg.shared_experts[0].positive_prompts:
        return ("shared_experts[0].positive_prompts",
                f"{kind.mergekit_name} output gates its shared expert: give it prompts (or gate_mode: random)")
    return None


def select_kind(cfg: MoEConfig, model_type: str) -> OutputKind:
    """The output kind: those whose name ``architecture`` starts (any case, ignoring punctuation; all when
    absent), the first that holds the experts (Mixtral preferred, as mergekit does)."""
    if cfg.architecture:
        want = _norm(cfg.architecture)
        named = [k for k in OUTPUT_KINDS if _norm(k.mergekit_name).startswith(want) or _norm(k.key).startswith(want)]
        if not named:
            raise _err(cfg.path, "architecture", f"unknown output architecture {cfg.architecture!r} (known: "
                                                 f"{', '.join(k.key for k in OUTPUT_KINDS)}; see --list-architectures)")
    else:
        named = list(OUTPUT_KINDS)
    problems = [(k, _kind_problem(k, cfg, model_type)) for k in named]
    fits = [k for k, p in problems if p is None]
    if fits:
        return next((k for k in fits if k.key == "mixtral"), fits[0])
    available = [(k, p) for k, p in problems if not k.unavailable] or problems
    _, (key, why) = available[0]
    if len(available) > 1:
        why += "; " + "; ".join(p[1] for _, p in available[1:])
    raise _err(cfg.path, key if cfg.architecture or len(available) == 1 else "architecture",
               f"no output architecture holds these experts: {why}")


def output_config(kind: OutputKind, base_config, num_experts: int, experts_per_token: int, dtype: torch.dtype):
    """The output model's transformers config: the base's settings, with the MoE fields mergekit-moe sets."""
    from transformers import CONFIG_MAPPING

    drop = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype", "torch_dtype"}
    values = {k: v for k, v in base_config.to_dict().items() if k not in drop}
    if kind.key == "mixtral":
        values.update(num_local_experts=num_experts, sliding_window=None)
    else:
        values.update(num_experts=num_experts, decoder_sparse_step=1, norm_topk_prob=True, mlp_only_layers=[],
                      moe_intermediate_size=base_config.intermediate_size)
        if kind.key == "qwen2_moe":
            values.update(shared_expert_intermediate_size=base_config.intermediate_size, sliding_window=None,
                          use_sliding_window=False)
    values["num_experts_per_tok"] = experts_per_token
    out = CONFIG_MAPPING[kind.model_type](**values)
    out.architectures = [kind.architecture]
    out.dtype = str(dtype).removeprefix("torch.")
    return out


def load_output_config(plan: MoEPlan):
    """:func:`output_config` from the base's transformers config, checked against the weights the layout was
    planned from (layers, sizes, tied embeddings, attention biases); a one-line ConfigError naming
    ``base_model`` where they disagree."""
    from transformers import AutoConfig

    cfg = plan.config
    try:
        base_config = AutoConfig.from_pretrained(str(plan.base_path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _err(cfg.path, "base_model", f"cannot read the config of {plan.base_path}: {first_line(exc)}") from None
    out = output_config(plan.kind, base_config, len(cfg.experts), cfg.experts_per_token, plan.out_dtype)
    prefix = "model.layers.0.self_attn"
    weights = {"num_hidden_layers": plan.layers, "hidden_size": plan.hidden, "vocab_size": plan.vocab,
               "intermediate_size": plan.layout[_expert_names(plan.kind, 0, 0)["gate_proj"]][0][0],
               "tie_word_embeddings": plan.tied}
    if plan.kind.key == "qwen3_moe":
        weights["attention_bias"] = f"{prefix}.q_proj.bias" in plan.layout
    if plan.kind.key == "qwen2_moe":
        weights["qkv_bias"] = True
    for key, held in weights.items():
        said = getattr(out, key, None)
        if (bool(said) if isinstance(held, bool) else said) != held:
            raise _err(cfg.path, "base_model", f"the config of {plan.base_path} says {key} {said}, its weights "
                                               f"hold {held}")
    return out


_EXPERT_RE = re.compile(r"^(.*\.layers\.(\d+))\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_SHARED_RE = re.compile(r"^(.*\.layers\.(\d+))\.mlp\.shared_experts?\.(gate_proj|up_proj|down_proj)\.weight$")
_ROUTER_RE = re.compile(r"^.*\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")
_SHARED_GATE_RE = re.compile(r"^.*\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _expert_names(kind: OutputKind, layer: int, expert: int) -> dict[str, str]:
    """Saved names of routed expert ``expert`` of ``layer``: dense projection -> name."""
    if kind.key == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {proj: f"{p}.{w}.weight" for w, proj in _MIXTRAL_PROJ.items()}
    return {proj: f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight" for proj in MLP_PROJS}


def moe_layout(kind: OutputKind, base_shapes: dict[str, tuple[int, ...]], layers: int, num_experts: int,
               dtype: torch.dtype, tied: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors ``save_pretrained`` writes for the ``kind`` model built from a dense base with tensors
    ``base_shapes`` (name -> shape): transformers' names with the experts one by one (its weight-conversion
    reversal), shapes from the base's. Embeddings, norms and attention come from the base (Qwen3-MoE: with
    its q/k norms and, when the base has them, attention biases; Qwen2-MoE: q/k/v biases, zeros when the
    base has none); each layer's router has ``num_experts`` rows; Qwen2-MoE adds the shared expert and its
    one-row gate; no ``lm_head`` when ``tied``. Sorted by name. A base tensor that is needed but missing
    raises KeyError naming it."""
    out: dict[str, tuple[int, ...]] = {}

    def base(name: str) -> tuple[int, ...]:
        if name not in base_shapes:
            raise KeyError(name)
        out[name] = tuple(base_shapes[name])
        return out[name]

    hidden = base("model.embed_tokens.weight")[1]
    base("model.norm.weight")
    if not tied:
        base("lm_head.weight")
    mlp = "block_sparse_moe" if kind.key == "mixtral" else "mlp"
    for i in range(layers):
        p = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            base(f"{p}.{norm}.weight")
        rows = {proj: base(f"{p}.self_attn.{proj}.weight")[0] for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if kind.key == "qwen2_moe":
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{p}.self_attn.{proj}.bias"] = (rows[proj],)
        if kind.key == "qwen3_moe":
            base(f"{p}.self_attn.q_norm.weight")
            base(f"{p}.self_attn.k_norm.weight")
            if "model.layers.0.self_attn.q_proj.bias" in base_shapes:
                for proj in rows:
                    base(f"{p}.self_attn.{proj}.bias")
        dense = {proj: base_shapes.get(f"{p}.mlp.{proj}.weight") for proj in MLP_PROJS}
        if any(shape is None for shape in dense.values()):
            raise KeyError(next(f"{p}.mlp.{proj}.weight" for proj, shape in dense.items() if shape is None))
        for e in range(num_experts):
            for proj, name in _expert_names(kind, i, e).items():
                out[name] = tuple(dense[proj])
        out[f"{p}.{mlp}.gate.weight"] = (num_experts, hidden)
        if kind.key == "qwen2_moe":
            for proj in MLP_PROJS:
                out[f"{p}.mlp.shared_expert.{proj}.weight"] = tuple(dense[proj])
            out[f"{p}.mlp.shared_expert_gate.weight"] = (1, hidden)
    return {k: (out[k], dtype) for k in sorted(out)}


def _layer_count(names) -> int:
    """Decoder layers of a checkpoint: one more than the largest ``model.layers.N`` (0 when none)."""
    found = [int(m.group(1)) for m in map(_LAYER_RE.match, names) if m]
    return max(found) + 1 if found else 0


def _tokenizer_size(path: Path) -> int | None:
    """Tokens of the tokenizer in ``path`` read from its ``tokenizer.json`` (with its added tokens and those
    of ``tokenizer_config.json``), without transformers; None when it has no tokenizer.json."""
    import tokenizers

    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    n = tokenizers.Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    try:
        extra = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("added_tokens_decoder")
    except (OSError, ValueError, AttributeError):
        extra = None
    ids = [int(k) for k in extra if str(k).isdigit()] if isinstance(extra, dict) else []
    return max([n, *(i + 1 for i in ids)])


def plan_moe(cfg: MoEConfig, *, seed: int = 0, device: str = "cpu", allow_same_experts: bool = False) -> MoEPlan:
    """Resolve and check every model of ``cfg`` (config.json files, safetensors headers and the tokenizer;
    no weight and no transformers model code): experts of the base's architecture and shapes, LoRA adapters
    that fit, an output kind that holds them. One-line errors naming the key."""
    base_path = _resolve(cfg, "base_model", cfg.base_model)
    base_json = _read_config_json(cfg, "base_model", base_path)
    model_type = str(base_json.get("model_type"))
    kind = select_kind(cfg, model_type)
    try:
        base_reader = CheckpointReader(base_path)
    except LLMMergingError as exc:
        raise _err(cfg.path, "base_model", str(exc)) from None
    base_shapes = {n: tuple(base_reader.shape(n)) for n in base_reader.keys()}
    base_reader.close()
    layers = _layer_count(base_shapes)
    mlp_names = [f"model.layers.{i}.mlp.{p}.weight" for i in range(layers) for p in MLP_PROJS]
    missing = [n for n in mlp_names if n not in base_shapes] if layers else ["model.layers.0.mlp.gate_proj.weight"]
    if missing:
        raise _err(cfg.path, "base_model", f"{base_path} has no tensor '{missing[0]}' (a dense "
                                           f"gate_proj/up_proj/down_proj MLP in every layer is needed)")
    dims = {"hidden_size": 1, "intermediate_size": 0}  # the axis of gate_proj [intermediate, hidden] holding each
    for e in list(cfg.experts) + list(cfg.shared_experts):
        model_text, _, lora_text = e.source_model.partition("+")
        e.model_path = _resolve(cfg, f"{e.where}.source_model", model_text)
        if lora_text:
            e.lora_path = _resolve(cfg, f"{e.where}.source_model", lora_text)
            if not is_adapter_dir(e.lora_path):
                raise _err(cfg.path, f"{e.where}.source_model", f"'{lora_text}' is not a PEFT adapter "
                                                               "(no adapter_config.json)")
        elif is_adapter_dir(e.model_path):
            raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' is a LoRA adapter: write it "
                                                           "BASE+LORA (the model it applies to, '+', the adapter)")
        data = _read_config_json(cfg, f"{e.where}.source_model", e.model_path)
        if data.get("model_type") != model_type:
            raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' is a {data.get('model_type')} model, "
                                                           f"the base model is {model_type}; experts must share "
                                                           "the base's architecture")
        try:
            reader = CheckpointReader(e.model_path)
        except LLMMergingError as exc:
            raise _err(cfg.path, f"{e.where}.source_model", str(exc)) from None
        try:
            shapes = {n: tuple(reader.shape(n)) for n in reader.keys()}
        finally:
            reader.close()
        first, theirs = mlp_names[0], _layer_count(shapes)  # sizes, then depth, then every tensor
        for key, axis in dims.items():
            if first in shapes and len(shapes[first]) == 2 and shapes[first][axis] != base_shapes[first][axis]:
                raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' has {key} {shapes[first][axis]}, "
                                                               f"the base model {base_shapes[first][axis]}")
        if theirs != layers:
            raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' has num_hidden_layers {theirs}, "
                                                           f"the base model {layers}")
        for n in mlp_names:
            if n not in shapes:
                raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' has no tensor '{n}'")
            if shapes[n] != base_shapes[n]:
                raise _err(cfg.path, f"{e.where}.source_model", f"'{model_text}' tensor '{n}' is "
                                                               f"{shape_str(shapes[n])}, the base model's "
                                                               f"{shape_str(base_shapes[n])}")
        if e.lora_path is not None:
            try:
                adapter = LoraAdapter.load(e.lora_path)
                adapter.bind(shapes)
            except LLMMergingError as exc:
                raise _err(cfg.path, f"{e.where}.source_model", str(exc)) from None
            outside = sorted(n for n in adapter.param_names() if n not in set(mlp_names))
            if outside:
                logger.warning("%s: the adapter changes %d tensors outside the MLPs (e.g. %s); an MoE takes only "
                               "the experts' MLPs, the rest comes from base_model", e.where, len(outside), outside[0])
            adapter.close()
    if not allow_same_experts and len(cfg.experts) > 1 and len({e.source_model for e in cfg.experts}) == 1:
        raise _err(cfg.path, "experts", "every expert is the same model, so the MoE computes what that model "
                                        "computes, at a higher cost (pass --allow-same-experts to build it anyway, "
                                        "e.g. to train it afterwards)")
    out_dtype = DTYPES.get(cfg.dtype or "") or _stored_dtype(base_json)
    tied = bool(base_json.get("tie_word_embeddings", False))  # the default of every input model type
    if not tied and "lm_head.weight" not in base_shapes:
        raise _err(cfg.path, "base_model", f"{base_path} has no lm_head.weight and does not tie it to the embeddings")
    try:
        layout = moe_layout(kind, base_shapes, layers, len(cfg.experts), out_dtype, tied)
    except KeyError as exc:
        raise _err(cfg.path, "base_model", f"{base_path} has no tensor '{exc.args[0]}', which the "
                                           f"{kind.mergekit_name} output needs") from None
    dropped = sorted(n for n in base_shapes if n not in layout and n not in set(mlp_names)
                     and not (tied and n == "lm_head.weight"))
    if dropped:
        logger.warning("base_model: the %s output has no place for %d of its tensors (e.g. %s); they are left out",
                       kind.mergekit_name, len(dropped), dropped[0])
    tokenizer_path = base_path
    if cfg.tokenizer_source and cfg.tokenizer_source != "base":
        tokenizer_path = _resolve(cfg, "tokenizer_source", cfg.tokenizer_source)
    vocab = base_shapes["model.embed_tokens.weight"][0]
    _check_tokenizer(cfg, tokenizer_path, vocab)
    return MoEPlan(config=cfg, kind=kind, base_path=base_path, base_json=base_json, layers=layers,
                   hidden=base_shapes["model.embed_tokens.weight"][1], vocab=vocab, tied=tied, out_dtype=out_dtype,
                   tokenizer_path=tokenizer_path, layout=layout, seed=seed, device=device)


def input_dirs(plan: MoEPlan) -> tuple[Path, ...]:
    """Every local directory the build reads: the base, the experts and their adapters, the tokenizer source."""
    dirs = [plan.base_path, plan.tokenizer_path]
    for e in list(plan.config.experts) + list(plan.config.shared_experts):
        dirs += [p for p in (e.model_path, e.lora_path) if p is not None]
    return tuple(dict.fromkeys(dirs))


def check_output_dir(plan: MoEPlan, output_dir: str | os.PathLike, label: str = "output_dir") -> Path:
    """``output_dir`` as a directory to create: new or empty, and none of the inputs (nor above one);
    a one-line ConfigError naming ``label`` otherwise (``core.io.check_new_dir``)."""
    return check_new_dir(output_dir, label, inputs=input_dirs(plan))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_shard_size(value: str | int, label: str = "max_shard_size") -> int:
    """A shard size in bytes: an integer, or a number with KB/MB/GB/TB (powers of 1000, as ``save_pretrained``)
    or KiB/MiB/GiB/TiB; a one-line ConfigError naming ``label`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ConfigError(f"{label} {value!r}: expected a size such as 5GB, 500MB or 2GiB (or a number of bytes)")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n < 1:
        raise ConfigError(f"{label} {value!r}: expected a positive size such as 5GB")
    return n


def _stored_dtype(config_json: dict) -> torch.dtype:
    """The base checkpoint's dtype from its config (mergekit's default output dtype); float32 when unnamed."""
    name = str(config_json.get("dtype") or config_json.get("torch_dtype") or "float32")
    return DTYPES.get(name, torch.float32)


def _check_tokenizer(cfg: MoEConfig, path: Path, vocab: int, tok=None) -> None:
    """The output tokenizer must load and fit the base model's embedding rows: counted from its
    tokenizer.json (or ``tok``, the tokenizer as loaded; loaded here when there is no tokenizer.json)."""
    key = "tokenizer_source" if cfg.tokenizer_source else "base_model"
    label = f"'{cfg.tokenizer_source or cfg.base_model}'"
    try:
        n = len(tok) if tok is not None else _tokenizer_size(path)
        if n is None:
            n = len(load_tokenizer(path, label))
    except LLMMergingError as exc:
        raise type(exc)(f"moe config {cfg.path}: {key}: {exc}") from None
    except Exception as exc:  # tokenizers' own parse errors
        raise ConfigError(f"moe config {cfg.path}: {key}: cannot load the tokenizer of {label} ({path}): "
                          f"{first_line(exc)}") from None
    if n > vocab:
        raise _err(cfg.path, key, f"the tokenizer in {path} has {n} tokens, more than the base model's "
                                  f"{vocab} embedding rows")


# ------------------------------------------------------------------------------------------------------
# gates
# ------------------------------------------------------------------------------------------------------
def prompt_tokenizer(path: str | os.PathLike):
    """The base tokenizer set up as mergekit-moe uses it for prompts: left padding, padded with BOS (EOS
    when there is none)."""
    tok = load_tokenizer(Path(path), "the base model")
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_prompts(tokenizer, prompts: list[str]):
    """Each prompt after the BOS text, without added special tokens, padded into one batch (mergekit's way)."""
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def _cheap_vectors(embed: torch.Tensor, tokenizer, layers: int) -> Callable[[list[str]], torch.Tensor]:
    def vectors(prompts: list[str]) -> torch.Tensor:
        batch = tokenize_prompts(tokenizer, prompts)
        return cheap_embedding(embed, batch["input_ids"], batch["attention_mask"], layers)

    return vectors


def _hidden_vectors(plan: MoEPlan, tokenizer, average: bool) -> Callable[[list[str]], torch.Tensor]:
    from transformers import AutoModel

    # the decoder without its head (the same hidden states; the head is never needed), in bfloat16 as mergekit
    model = AutoModel.from_pretrained(str(plan.base_path), dtype=torch.bfloat16).to(plan.device).eval()

    @torch.no_grad()
    def vectors(prompts: list[str]) -> torch.Tensor:
        batch = tokenize_prompts(tokenizer, prompts).to(plan.device)
        out = model(**batch, output_hidden_states=True, return_dict=True)
        return pool_hidden_states(out.hidden_states, average=average).cpu()

    return vectors


def compute_gates(plan: MoEPlan, progress: bool = True) -> torch.Tensor:
    """Router rows ``(layers, gated experts, hidden)`` for ``plan.config.gate_mode`` (see the module doc)."""
    from tqdm.auto import tqdm

    cfg, layers, hidden, experts = plan.config, plan.layers, plan.hidden, plan.gated
    if cfg.gate_mode in ("random", "uniform_random"):
        return random_gates(layers, len(experts), hidden, seed=plan.seed, uniform=cfg.gate_mode == "uniform_random")
    tokenizer = prompt_tokenizer(plan.base_path)
    if cfg.gate_mode == "cheap_embed":
        with CheckpointReader(plan.base_path) as reader:
            embed = reader.get("model.embed_tokens.weight")
        vectors = _cheap_vectors(embed, tokenizer, layers)
    else:
        vectors = _hidden_vectors(plan, tokenizer, average=cfg.gate_mode == "hidden_avg")
    rows = []
    for e in tqdm(experts, desc="expert prompts", disable=not progress):
        pos = vectors(e.positive_prompts or [])
        rows.append(gate_rows(pos, vectors(e.negative_prompts) if e.negative_prompts else None))
    del vectors  # frees the base model of hidden gates
    return torch.stack(rows, dim=0).permute(1, 0, 2).contiguous()


# ------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------
class _Sources:
    """The input tensors: one reader per model directory, LoRA adapters bound to their model, noise seeded
    per tensor."""

    def __init__(self, plan: MoEPlan) -> None:
        self.plan = plan
        self.readers: dict[Path, CheckpointReader] = {}
        self.adapters: dict[Path, LoraAdapter] = {}

    def reader(self, path: Path) -> CheckpointReader:
        if path not in self.readers:
            self.readers[path] = CheckpointReader(path)
        return self.readers[path]

    def base(self, name: str) -> torch.Tensor | None:
        reader = self.reader(self.plan.base_path)
        return reader.get(name) if name in reader else None

    def expert(self, e: ExpertSpec, name: str, saved: str) -> torch.Tensor:
        """Expert ``e``'s tensor ``name`` (with its LoRA merged, noise added and residual scale applied)."""
        t = self.reader(e.model_path).get(name)
        if e.lora_path is not None:
            if e.lora_path not in self.adapters:
                adapter = LoraAdapter.load(e.lora_path)
                reader = self.reader(e.model_path)
                adapter.bind({k: tuple(reader.shape(k)) for k in reader.keys()})
                self.adapters[e.lora_path] = adapter
            delta = self.adapters[e.lora_path].delta(name, t)
            if delta is not None:
                t = t.float() + delta
        if e.noise_scale is not None:
            gen = torch.Generator().manual_seed(tensor_seed(self.plan.seed, saved))
            t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * e.noise_scale
        if e.residual_scale is not None and name.endswith("down_proj.weight"):
            t = t * e.residual_scale
        return t

    def span(self, name: str) -> tuple[Path, int, int] | None:
        """Where saved tensor ``name``'s bytes can be copied from as they are, ``(file, offset, bytes)``: a
        plain safetensors tensor of the output dtype, taken unchanged (no LoRA, noise or residual scale);
        None when it must be computed."""
        where, what = tensor_source(self.plan, name)
        if where == "expert":
            e, source = what
            if e.lora_path is not None or e.noise_scale is not None or (
                    e.residual_scale is not None and source.endswith("down_proj.weight")):
                return None
            reader = self.reader(e.model_path)
        elif where == "base":
            reader, source = self.reader(self.plan.base_path), what
            if source not in reader:
                return None
        else:
            return None
        found = reader.span(source)
        if found is None or found[3] != self.plan.out_dtype or tuple(reader.shape(source)) != self.plan.layout[name][0]:
            return None
        return found[0], found[1], found[2]

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        for a in self.adapters.values():
            a.close()


def tensor_seed(seed: int, name: str) -> int:
    """The seed of tensor ``name``'s noise: fixed by the run's seed and the name."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2 ** 63)


def tensor_source(plan: MoEPlan, name: str) -> tuple[str, Any]:
    """Where saved tensor ``name`` comes from: ``("expert", (spec, source name))``, ``("router", layer)``,
    ``("shared_gate", layer)`` or ``("base", name)``."""
    cfg = plan.config
    m = _EXPERT_RE.match(name)
    if m:
        proj = _MIXTRAL_PROJ.get(m.group(4), m.group(4))
        return "expert", (cfg.experts[int(m.group(3))], f"model.layers.{m.group(2)}.mlp.{proj}.weight")
    m = _SHARED_RE.match(name)
    if m:
        return "expert", (cfg.shared_experts[0], f"model.layers.{m.group(2)}.mlp.{m.group(3)}.weight")
    m = _SHARED_GATE_RE.match(name)
    if m:
        return "shared_gate", int(m.group(1))
    m = _ROUTER_RE.match(name)
    if m:
        return "router", int(m.group(1))
    return "base", name


def _fetch(plan: MoEPlan, sources: _Sources, name: str) -> torch.Tensor:
    """Saved tensor ``name`` other than a router, computed (LoRA merged, noise, residual scale, zero biases)."""
    where, what = tensor_source(plan, name)
    if where == "expert":
        return sources.expert(what[0], what[1], name)
    value = sources.base(what)
    if value is None and name.endswith("_proj.bias"):  # Qwen2-MoE's attention biases, from a model without
        return torch.zeros(plan.layout[name][0])
    if value is None:
        raise _err(plan.config.path, "base_model", f"{plan.base_path} has no tensor '{name}', which the "
                                                   f"{plan.kind.mergekit_name} output needs")
    return value


def _write_weights(plan: MoEPlan, sources: _Sources, writer: ShardWriter, stop: threading.Event, bar) -> float:
    """Every saved tensor but the routers into ``writer``, then flushed to the disk: bytes that stay as they
    are copied file to file, the others computed and cast; returns early once ``stop`` is set. Returns when
    it ended (``time.perf_counter``)."""
    for name, (_, dtype) in plan.layout.items():
        if stop.is_set():
            return time.perf_counter()
        if tensor_source(plan, name)[0] in ("router", "shared_gate"):
            continue
        span = sources.span(name)
        if span is not None:
            writer.copy(name, *span)
        else:
            writer.write(name, _fetch(plan, sources, name).detach().to(device="cpu", dtype=dtype).contiguous())
        bar.update(1)
    writer.sync()
    return time.perf_counter()


def _write_files(plan: MoEPlan, out_config, folder: Path) -> None:
    """Config, generation config, tokenizer, the YAML as written and the model card."""
    from transformers import GenerationConfig

    cfg = plan.config
    out_config.save_pretrained(str(folder))
    gen_file = plan.base_path / "generation_config.json"
    generation = (GenerationConfig.from_pretrained(str(plan.base_path)) if gen_file.is_file()
                  else GenerationConfig.from_model_config(out_config))
    generation.save_pretrained(str(folder))
    tokenizer = load_tokenizer(plan.tokenizer_path, f"'{cfg.tokenizer_source or cfg.base_model}'")
    _check_tokenizer(cfg, plan.tokenizer_path, plan.vocab, tokenizer)
    tokenizer.save_pretrained(str(folder))
    (folder / "mergekit_moe_config.yml").write_text(cfg.text, encoding="utf-8")
    info = {"method": f"moe ({plan.kind.mergekit_name}, gate_mode {cfg.gate_mode})",
            "base": {"id": cfg.base_model},
            "experts": [{"id": e.source_model, "kind": "lora" if e.lora_path else "full"}
                        for e in cfg.experts + cfg.shared_experts],
            "hyperparameters": {"experts_per_token": cfg.experts_per_token, "seed": plan.seed,
                                "dtype": str(plan.out_dtype).removeprefix("torch.")}}
    (folder / "README.md").write_text(model_card(info), encoding="utf-8")


def _join(pool, stop: threading.Event) -> None:
    """Wait for ``pool``'s thread to end; a Ctrl-C meanwhile only sets ``stop`` again and waits on."""
    while True:
        try:
            pool.shutdown(wait=True)
            return
        except KeyboardInterrupt:
            stop.set()


def build_moe(plan: MoEPlan, output_dir: str | os.PathLike, *, progress: bool = True,
              gates: torch.Tensor | None = None, max_shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write the MoE into ``output_dir`` (atomically; it must be new or empty and none of the inputs, checked
    first, with ``max_shard_size``). The weights are written by a second thread (bytes that stay as they
    are copied file to file by the kernel) while this one loads transformers, writes the config, tokenizer
    and model card and computes the gates (unless given); the routers go in last. Returns a summary (kind,
    experts, gate mode, degenerate layers, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cfg = plan.config
    output_dir = check_output_dir(plan, output_dir)
    max_shard_size = parse_shard_size(max_shard_size)
    n = len(cfg.experts)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(output_dir)
    tmp.mkdir()
    sources = _Sources(plan)
    writer = None
    bar = tqdm(total=len(plan.layout), desc="MoE tensors", disable=not progress)
    try:
        writer = ShardWriter(tmp, plan.layout, max_shard_size)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-weights")
        weights = pool.submit(_write_weights, plan, sources, writer, stop, bar)
        try:
            _write_files(plan, load_output_config(plan), tmp)
            t_files = time.perf_counter()
            if weights.done():
                weights.result()  # the thread failed: no gates to compute
            if gates is None:
                gates = compute_gates(plan, progress=progress)
            t_gates = time.perf_counter()
            t_weights = weights.result()
        except BaseException:
            stop.set()  # the thread ends after its current tensor
            raise
        finally:
            _join(pool, stop)  # before anything it uses is closed or removed, even on a second Ctrl-C
        logger.info("weights written in %.1f s, meanwhile config and tokenizer in %.1f s and gates in %.1f s",
                    t_weights - t0, t_files - t0, t_gates - t_files)
        degenerate = degenerate_layers(gates)
        if degenerate:
            logger.warning("%d of %d layers have nearly dependent router rows (e.g. layer %d): the prompts may be "
                           "too similar, and some experts will rarely be chosen there", len(degenerate),
                           gates.shape[0], degenerate[0])
        for name, (_, dtype) in plan.layout.items():
            where, layer = tensor_source(plan, name)
            if where in ("router", "shared_gate"):
                rows = gates[layer, :n] if where == "router" else gates[layer, n:n + 1]
                writer.write(name, rows.to(dtype).contiguous())
                bar.update(1)
        bar.close()
        writer.finish()
        replace_path(tmp, output_dir)
    except BaseException:
        bar.close()
        if writer is not None:
            writer.close()
        remove_path(tmp)
        raise
    finally:
        sources.close()
    return {"output": str(output_dir), "architecture": plan.kind.key, "experts": n,
            "shared_experts": len(cfg.shared_experts), "experts_per_token": cfg.experts_per_token,
            "gate_mode": cfg.gate_mode, "dtype": str(plan.out_dtype).removeprefix("torch."),
            "degenerate_layers": degenerate, "tensors": len(plan.layout), "seconds": time.perf_counter() - t0,
            "timings": {"config_and_tokenizer": t_files - t0, "gates": t_gates - t_files, "weights": t_weights - t0}}


def build_from_file(path: str | os.PathLike, output_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
                    allow_same_experts: bool = False, progress: bool = True) -> dict[str, Any]:
    """Read, check and build: ``llm-merging moe CONFIG OUT`` as a library call."""
    plan = plan_moe(load_moe_config(path), seed=seed, device=device, allow_same_experts=allow_same_experts)
    return build_moe(plan, output_dir, progress=progress)
