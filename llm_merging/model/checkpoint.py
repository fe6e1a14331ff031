"""Lazy, tensor-by-tensor reading of full checkpoints, and full fine-tunes seen as task vectors.

`CheckpointReader` opens a Hugging Face model directory (single or sharded safetensors, single or sharded
``pytorch_model.bin``) and reads one tensor at a time; nothing is loaded up front except file headers.

`FullExpert` exposes a full fine-tune with the duck-typed expert protocol shared with
`llm_merging.model.lora.LoraAdapter`: ``name``, ``bind(shapes)``, ``param_names()``,
``delta(param_name, base)``.

The helpers `read_safetensors_header` (integrity check before any mmap read) and `match_names`
(parameter-name mapping tolerant of a differing leading prefix) are shared with the LoRA code.

Mixture-of-experts checkpoints: transformers 5 holds experts fused (``mlp.experts.gate_up_proj``) while
checkpoints may store one tensor per expert and projection; `saved_layout` traces transformers' own
conversion between the two, and `FullExpert` reads either layout as the fused parameters (by parts).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from llm_merging.core.errors import CheckpointError, LLMMergingError, first_line

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# bytes per element of each safetensors dtype (sub-byte types counted per packed byte where relevant)
_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


_ST_TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


def _move(t: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """Move first, then cast: the transfer carries the stored (often half-precision) bytes and the
    cast runs on the target device (a one-call ``to(cuda, float32)`` would cast on the CPU)."""
    if device is not None:
        t = t.to(device=device)
    if dtype is not None:
        t = t.to(dtype=dtype)
    return t


def shape_str(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# --------------------------------------------------------------------------------------------------------
# safetensors integrity
# --------------------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike, error_cls: type[LLMMergingError] = CheckpointError) -> dict:
    """Read and check the header of a safetensors file *without* touching its data.

    Returns ``{tensor_name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` removed). Raises
    ``error_cls`` naming the file when the file is too short, the header is not valid JSON, or the
    header's offsets point past the end of the file (a truncated download): reading such a file through
    mmap could crash the process, so this check runs before any tensor is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error_cls(f"corrupted safetensors file {path}: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise error_cls(
                    f"truncated or corrupted safetensors file {path}: header length {n} exceeds file size {size}"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise error_cls(f"cannot read safetensors file {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        msg = first_line(exc)
        raise error_cls(f"corrupted safetensors file {path}: bad header ({msg})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_end = 0
    for key, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(s) for s in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise error_cls(f"corrupted safetensors file {path}: bad header entry for tensor '{key}'") from None
        bits = _ST_DTYPE_BITS.get(dtype)
        if bits is not None:
            numel = 1
            for s in shape:
                numel *= s
            if end - start != (numel * bits + 7) // 8:
                raise error_cls(
                    f"corrupted safetensors file {path}: tensor '{key}' {dtype}{shape_str(shape)} "
                    f"has {end - start} bytes"
                )
        if start < 0 or end < start:
            raise error_cls(f"corrupted safetensors file {path}: bad offsets for tensor '{key}'")
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise error_cls(
            f"truncated safetensors file {path}: its header needs {data_start + data_end} bytes "
            f"but the file has {size}"
        )
    return header


def open_safetensors(path: str | os.PathLike, error_cls: type[LLMMergingError] = CheckpointError):
    """Check ``path`` (see `read_safetensors_header`) and return ``(safe_open handle, header)``."""
    from safetensors import safe_open

    header = read_safetensors_header(path, error_cls)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type on a bad header
        msg = first_line(exc)
        raise error_cls(f"corrupted safetensors file {path}: {msg}") from None
    return handle, header


def load_torch_file(path: str | os.PathLike, error_cls: type[LLMMergingError] = CheckpointError) -> dict:
    """``torch.load`` a ``.bin`` state dict lazily (mmap, weights only); errors name the file."""
    path = Path(path)
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            # legacy (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error_cls(f"missing weights file {path}") from None
    except Exception as exc:
        msg = first_line(exc)
        raise error_cls(f"cannot read truncated or corrupted weights file {path}: {msg}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error_cls(f"weights file {path} does not hold a state dict of tensors")
    return obj


# --------------------------------------------------------------------------------------------------------
# name mapping
# --------------------------------------------------------------------------------------------------------
def match_names(src_names: Iterable[str], dst_names: Iterable[str]) -> dict[str, str]:
    """Map source tensor names onto destination names, tolerating a differing leading prefix.

    One rule ``src_prefix -> dst_prefix`` is chosen for the whole checkpoint: the one that maps the most
    source names (a core of at least two dotted components must be shared, e.g. ``q_proj.weight``); ties
    prefer the shortest prefixes, so identical names win. Names the rule does not map fall back to an
    identical destination name. Examples: ``layers.0.x.weight -> model.layers.0.x.weight``,
    ``transformer.h.0.attn.c_attn.weight -> h.0.attn.c_attn.weight``. Unmapped names are left out.
    """
    src = list(dict.fromkeys(src_names))
    dst = set(dst_names)
    suffix_index: dict[str, list[str]] = {}
    for d in dst:
        parts = d.split(".")
        for i in range(len(parts) - 1):  # core of >= 2 components
            suffix_index.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + "." if i else "")
    votes: Counter = Counter()
    for s in src:
        parts = s.split(".")
        for i in range(len(parts) - 1):
            core = ".".join(parts[i:])
            hits = suffix_index.get(core)
            if hits:
                sp = ".".join(parts[:i]) + "." if i else ""
                for dp in set(hits):
                    votes[(sp, dp)] += 1
                break
    mapping: dict[str, str] = {}
    if votes:
        (sp, dp), _ = min(votes.items(), key=lambda kv: (-kv[1], len(kv[0][0]) + len(kv[0][1]), kv[0]))
        for s in src:
            if s.startswith(sp):
                d = dp + s[len(sp):]
                if d in dst:
                    mapping[s] = d
    taken = set(mapping.values())
    for s in src:
        if s not in mapping and s in dst and s not in taken:
            mapping[s] = s
            taken.add(s)
    return mapping


_VOCAB_MODULES = ("lm_head", "wte", "embed_tokens", "word_embeddings", "embed_in", "embed_out", "shared",
                  "tok_embeddings", "output", "embeddings", "wpe_vocab")


def is_vocab_param(name: str) -> bool:
    """Whether ``name`` is an input embedding or output head whose first dimension is the vocabulary."""
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else parts[-1]
    return module in _VOCAB_MODULES or "embed" in module or module.endswith("lm_head")


EMBED_CANDIDATES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                     "tok_embeddings.weight", "shared.weight")


# --------------------------------------------------------------------------------------------------------
# on-disk names of fused parameters (mixture-of-experts checkpoints)
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One tensor as a checkpoint stores it (``name``, ``shape``), held by an in-memory parameter at its flat
    entries ``start … start + numel − 1`` (``start`` −1: not a contiguous range of the parameter)."""

    name: str
    start: int
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class _Probe(torch.Tensor):
    """A meta tensor whose ``contiguous()`` is itself: transformers' reverse weight conversions then leave
    views of the parameter (offset, strides) instead of copies."""

    def contiguous(self, *args, **kwargs):
        return self


def saved_tensors(model: torch.nn.Module, as_loaded: bool = True) -> list[tuple[str, Part]] | None:
    """Every tensor transformers' ``save_pretrained`` writes for the state dict of ``model``, in the order
    it hands them to the sharding, as ``(state dict name, Part)``: the part of that entry the saved tensor
    holds (see `saved_layout`). Computed from transformers' own reverse weight conversion run on meta
    tensors (no values); None when that conversion cannot be traced.

    ``as_loaded``: as ``save_pretrained`` writes this very model, i.e. reverting the conversions its
    ``from_pretrained`` applied (a model loaded from a checkpoint with fused experts is saved fused);
    False: the conversions of its architecture (the per-expert layout of the Hub checkpoints)."""
    from transformers.core_model_loading import revert_weight_conversion

    roots: dict[int, str] = {}
    probes: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple] = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        root = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        probe = root.as_subclass(_Probe)
        roots[id(root)] = roots[id(probe)] = name
        probes[name] = probe
        shapes[name] = tuple(t.shape)
    hidden = not as_loaded and "_weight_conversions" in vars(model)
    loaded = vars(model).pop("_weight_conversions", None) if hidden else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reverted = revert_weight_conversion(model, dict(probes))
    except Exception as exc:  # a conversion that needs real values
        logger.debug("weight conversions of %s cannot be traced: %s", type(model).__name__, first_line(exc))
        return None
    finally:
        if hidden:
            model._weight_conversions = loaded
    out: list[tuple[str, Part]] = []
    for key, t in reverted.items():
        owner = roots.get(id(t))
        base = getattr(t, "_base", None)
        if owner is None and base is not None:
            owner = roots.get(id(base))
        if owner is None:
            return None  # a new tensor: not a view of one state dict entry
        if tuple(t.shape) == shapes[owner] and t.storage_offset() == 0 and t.is_contiguous():
            out.append((owner, Part(key, 0, shapes[owner])))
            continue
        expected, contiguous = 1, True
        for size, stride in reversed(list(zip(t.shape, t.stride()))):
            if size != 1 and stride != expected:
                contiguous = False
            expected *= size
        out.append((owner, Part(key, int(t.storage_offset()) if contiguous else -1, tuple(t.shape))))
    return out


def saved_layout(model: torch.nn.Module, as_loaded: bool = False) -> dict[str, list[Part]] | None:
    """How transformers' ``save_pretrained`` writes the parameters of ``model`` whose saved form is not the
    parameter itself under its own name: ``{parameter (state dict) name: [Part, ...]}``, in order of
    ``start`` (every part ``start`` −1 when they do not tile the parameter).

    Transformers 5 holds the experts of a mixture-of-experts layer fused (e.g. Mixtral's
    ``mlp.experts.gate_up_proj`` of shape (E, 2I, H)) and converts them on load from, and on save back to,
    one tensor per expert and projection as the Hub checkpoints name them
    (``block_sparse_moe.experts.3.w1.weight``); other parameters may only be renamed (Mixtral's router
    ``block_sparse_moe.gate.weight``). See `saved_tensors` (``as_loaded``: default False, the layout of the
    architecture whatever layout ``model`` was loaded from); None when the conversion cannot be traced.
    Traced once per model (and ``as_loaded``): the layout depends on its config, not on its values."""
    cached = _MODEL_LAYOUTS.setdefault(model, {})
    if as_loaded not in cached:
        cached[as_loaded] = _trace_layout(model, as_loaded)
    return cached[as_loaded]


#: model -> {as_loaded: saved_layout}; entries go with their model
_MODEL_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _trace_layout(model: torch.nn.Module, as_loaded: bool) -> dict[str, list[Part]] | None:
    saved = saved_tensors(model, as_loaded)
    if saved is None:
        return None
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    parts: dict[str, list[Part]] = {}
    for owner, part in saved:
        parts.setdefault(owner, []).append(part)
    out: dict[str, list[Part]] = {}
    for owner, ps in parts.items():
        if len(ps) == 1 and ps[0].name == owner and ps[0].start == 0:
            continue  # saved as it is
        ps.sort(key=lambda p: p.start)
        end = 0
        for p in ps:  # the parts must tile the parameter
            if p.start != end:
                break
            end += p.numel
        if end != math.prod(shapes[owner]):
            ps = [Part(q.name, -1, q.shape) for q in ps]
        out[owner] = ps
    return out


_LAYOUT_CACHE: dict[str, tuple[dict[str, list[Part]], dict[str, tuple]]] = {}
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures")


def config_saved_layout(model_dir: str | os.PathLike) -> tuple[dict[str, list[Part]], dict[str, tuple]]:
    """`saved_layout` of the model a checkpoint directory's ``config.json`` describes (built on the meta
    device: no weights), and the shapes of those parameters; ``({}, {})`` when its model type has no weight
    conversions or the config cannot be read."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json" if model_dir.is_dir() else model_dir.parent / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(data, dict):
        return {}, {}
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    archs = [a for a in data.get("architectures") or [] if isinstance(a, str)]
    model_type = data.get("model_type")
    if not any(get_checkpoint_conversion_mapping(n) is not None for n in [*archs, model_type] if n):
        return {}, {}
    key = json.dumps({k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True,
                     default=str) + "|" + ",".join(archs)
    if key not in _LAYOUT_CACHE:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        layout, shapes = None, {}
        try:
            config = AutoConfig.from_pretrained(str(cfg.parent))
            cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls._from_config(config) if cls is not None else AutoModelForCausalLM.from_config(config)
            layout = saved_layout(model)
            if layout:
                shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n in layout}
        except Exception as exc:  # an architecture transformers cannot build: names are matched as they are
            logger.debug("no weight conversions for %s: %s", cfg, first_line(exc))
        _LAYOUT_CACHE[key] = (layout or {}, shapes)
    return _LAYOUT_CACHE[key]


# --------------------------------------------------------------------------------------------------------
# CheckpointReader
# --------------------------------------------------------------------------------------------------------
class CheckpointReader:
    """Read tensors one at a time from a Hugging Face model directory (or a single weights file).

    Supports ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
    ``pytorch_model.bin`` and sharded ``.bin`` with ``pytorch_model.bin.index.json`` (``.bin`` files are
    loaded with ``torch.load(mmap=True, weights_only=True)`` the first time one of their tensors is asked).
    Every safetensors file is checked for truncation when the reader opens; problems raise
    `CheckpointError` naming the file.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.path = Path(model_dir)
        self._key_file: dict[str, Path] = {}
        self._shapes: dict[str, tuple] = {}
        self._st_handles: dict[Path, object] = {}
        self._st_spans: dict[str, tuple[int, int, str]] = {}  # key -> (file offset, byte count, dtype)
        self._bin_cache: dict[Path, dict] = {}
        self.format: str
        if self.path.is_file():
            self._open_single(self.path)
        elif self.path.is_dir():
            if (self.path / SAFE_INDEX).is_file():
                self._open_index(self.path / SAFE_INDEX, safetensors=True)
            elif (self.path / SAFE_WEIGHTS).is_file():
                self._open_single(self.path / SAFE_WEIGHTS)
            elif (self.path / BIN_INDEX).is_file():
                self._open_index(self.path / BIN_INDEX, safetensors=False)
            elif (self.path / BIN_WEIGHTS).is_file():
                self._open_single(self.path / BIN_WEIGHTS)
            else:
                raise CheckpointError(
                    f"no model weights in {self.path} (looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                    f"{BIN_WEIGHTS}, {BIN_INDEX})"
                )
        else:
            raise CheckpointError(f"checkpoint path {self.path} does not exist")

    # -- opening ----------------------------------------------------------------------------------------
    def _open_single(self, file: Path) -> None:
        if file.name.endswith(".safetensors"):
            self.format = "safetensors"
            self._add_safetensors(file)
        else:
            self.format = "bin"
            sd = self._load_bin(file)
            for k, v in sd.items():
                self._key_file[k] = file
                self._shapes[k] = tuple(v.shape)

    def _add_safetensors(self, file: Path, expected: Iterable[str] | None = None, index: Path | None = None):
        handle, header = open_safetensors(file, CheckpointError)
        with open(file, "rb") as fh:
            data_start = 8 + struct.unpack("<Q", fh.read(8))[0]
        if any(info["dtype"] not in _ST_TORCH_DTYPES for info in header.values()):
            self._st_handles[file] = handle  # exotic dtypes: let safetensors decode them
        else:
            del handle  # plain reads keep expert pages out of this process's RSS (no mmap)
        for k, info in header.items():
            start, end = (int(x) for x in info["data_offsets"])
            self._st_spans[k] = (data_start + start, end - start, info["dtype"])
        if expected is None:
            expected = header.keys()
        for k in expected:
            info = header.get(k)
            if info is None:
                raise CheckpointError(f"broken index {index}: tensor '{k}' is not in shard {file}")
            self._key_file[k] = file
            self._shapes[k] = tuple(int(s) for s in info["shape"])

    def _open_index(self, index: Path, safetensors: bool) -> None:
        self.format = "safetensors" if safetensors else "bin"
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError("empty or invalid weight_map")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            msg = first_line(exc)
            raise CheckpointError(f"broken index {index}: {msg}") from None
        by_file: dict[str, list[str]] = {}
        for k, f in weight_map.items():
            by_file.setdefault(f, []).append(k)
        for fname, keys in by_file.items():
            shard = index.parent / fname
            if not shard.is_file():
                raise CheckpointError(f"broken index {index}: shard {shard} is missing")
            if safetensors:
                self._add_safetensors(shard, keys, index)
            else:
                for k in keys:  # shapes are read lazily, when the shard is first loaded
                    self._key_file[k] = shard

    def _load_bin(self, file: Path) -> dict:
        sd = self._bin_cache.get(file)
        if sd is None:
            sd = load_torch_file(file, CheckpointError)
            self._bin_cache[file] = sd
        return sd

    # -- API ----------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._key_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_file

    def file_of(self, key: str) -> Path:
        return self._file(key)

    def _file(self, key: str) -> Path:
        try:
            return self._key_file[key]
        except KeyError:
            raise CheckpointError(f"tensor '{key}' is not in checkpoint {self.path}") from None

    def _bin_tensor(self, key: str) -> torch.Tensor:
        file = self._file(key)
        sd = self._load_bin(file)
        if key not in sd:
            raise CheckpointError(f"broken index for {self.path}: tensor '{key}' is not in shard {file}")
        return sd[key]

    def bin_tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key`` of a ``.bin`` checkpoint as loaded (a view into the mmap-ed file: do not modify)."""
        return self._bin_tensor(key)

    def shape(self, key: str) -> tuple:
        if key not in self._shapes:
            self._shapes[key] = tuple(self._bin_tensor(key).shape)
        return self._shapes[key]

    def get(self, key: str, device=None, dtype=None) -> torch.Tensor:
        """Read one tensor (optionally moved to ``device`` and cast to ``dtype``)."""
        file = self._file(key)
        if self.format == "safetensors" and file not in self._st_handles:
            t = self._read_span(file, key)
        elif file in self._st_handles:
            try:
                t = self._st_handles[file].get_tensor(key)
            except Exception as exc:
                msg = first_line(exc)
                raise CheckpointError(f"cannot read tensor '{key}' from {file}: {msg}") from None
        else:  # a view into the mmap-ed file: always hand out a copy
            return _move(self._bin_tensor(key).clone(), device, dtype)
        return _move(t, device, dtype)

    def range_readable(self, key: str) -> bool:
        """Whether :meth:`get_range` can read parts of ``key`` (plain safetensors; not ``.bin``, exotic dtypes)."""
        return self.format == "safetensors" and self._file(key) not in self._st_handles and key in self._st_spans

    def span(self, key: str) -> tuple[Path, int, int, torch.dtype] | None:
        """Where tensor ``key``'s bytes lie, ``(file, byte offset, bytes, dtype)``, for a plain safetensors
        tensor (:meth:`range_readable`); None for the others."""
        if not self.range_readable(key):
            return None
        offset, nbytes, dtype = self._st_spans[key]
        return self._file(key), offset, nbytes, _ST_TORCH_DTYPES[dtype]

    def get_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Flat entries ``start … stop − 1`` of tensor ``key`` as stored (1-D, its own dtype), read from the
        file alone (see :meth:`range_readable`)."""
        file = self._file(key)
        if not self.range_readable(key):
            raise CheckpointError(f"tensor '{key}' in {file} cannot be read in parts")
        offset, nbytes, dtype = self._st_spans[key]
        dt = _ST_TORCH_DTYPES[dtype]
        size = torch.empty((), dtype=dt).element_size()
        n = (stop - start) * size
        if start < 0 or stop < start or stop * size > nbytes:
            raise ValueError(f"range {start}:{stop} is outside tensor '{key}'")
        buf = torch.empty(n, dtype=torch.uint8)
        try:
            with open(file, "rb", buffering=0) as fh:
                got = os.preadv(fh.fileno(), [memoryview(buf.numpy())], offset + start * size) if n else 0
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor '{key}' from {file}: {exc.strerror or exc}") from None
        if got != n:
            raise CheckpointError(f"truncated safetensors file {file}: tensor '{key}' is cut short")
        return buf.view(dt)

    def _read_span(self, file: Path, key: str) -> torch.Tensor:
        """Read one safetensors tensor with a plain file read into its own buffer."""
        offset, nbytes, dtype = self._st_spans[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)  # uninitialised: no zero-filling
        try:
            with open(file, "rb", buffering=0) as fh:
                fh.seek(offset)
                got = fh.readinto(memoryview(buf.numpy())) if nbytes else 0
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor '{key}' from {file}: {exc.strerror or exc}") from None
        if got != nbytes:
            raise CheckpointError(f"truncated safetensors file {file}: tensor '{key}' is cut short")
        shape = self._shapes[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=_ST_TORCH_DTYPES[dtype])
        return buf.view(_ST_TORCH_DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        self._st_handles.clear()
        self._bin_cache.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {self.format}, {len(self._key_file)} tensors)"


# --------------------------------------------------------------------------------------------------------
# FullExpert
# --------------------------------------------------------------------------------------------------------
def name_summary(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "position_ids")


class FullExpert:
    """A fully fine-tuned model seen as per-tensor task vectors ``expert - base`` (``kind`` "full").

    After `bind`, ``param_names()`` lists the base parameters the checkpoint provides; ``delta`` reads one
    tensor at a time. Attributes set by `bind`: ``mapping`` (base name -> checkpoint key),
    ``unmatched_keys`` (checkpoint tensors with no base parameter: warned), ``missing_params`` (base
    parameters absent from the checkpoint, whose task vector is 0: warned, except a tied ``lm_head``),
    ``vocab_mismatch`` (base name -> (base rows, expert rows)).
    """

    kind = "full"

    def __init__(self, model_dir: str | os.PathLike, name: str | None = None):
        self.path = Path(model_dir)
        self.name = name or self.path.name
        self.reader = CheckpointReader(self.path)
        self.mapping: dict[str, str] = {}
        self.unmatched_keys: list[str] = []
        self.missing_params: list[str] = []
        self.vocab_mismatch: dict[str, tuple[int, int]] = {}
        # True when an output tokenizer re-indexes the vocabulary tensors (read with `raw_tensor`): a
        # vocabulary mismatch is then expected, and not handled by `tensor` / `delta`'s pad-or-truncate
        self.vocab_reindexed = False
        self._bound = False
        self._tie = self._ties_embeddings()
        # a fused parameter the checkpoint stores in parts (see `saved_layout`): its in-memory name -> parts
        self._virtual: dict[str, list[Part]] = {}
        self._virtual_shapes: dict[str, tuple] = {}

    def _ties_embeddings(self) -> bool:
        cfg = self.path / "config.json" if self.path.is_dir() else self.path.parent / "config.json"
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        if "tie_word_embeddings" in data:
            return bool(data["tie_word_embeddings"])
        text_cfg = data.get("text_config")
        if isinstance(text_cfg, dict) and "tie_word_embeddings" in text_cfg:
            return bool(text_cfg["tie_word_embeddings"])
        return True  # transformers' default

    def bind(self, base_param_shapes: dict[str, tuple]) -> None:
        shapes = {k: tuple(int(s) for s in v) for k, v in base_param_shapes.items()}
        keys = self._translate(self.reader.keys(), shapes)
        m = match_names(keys, shapes)
        if not m:
            raise CheckpointError(
                f"expert {self.name} ({self.path}): no tensor in common with the base model "
                f"(checkpoint has e.g. {name_summary(keys, 3)}; base has e.g. {name_summary(list(shapes), 3)})"
            )
        mapping: dict[str, str] = {}
        vocab: dict[str, tuple[int, int]] = {}
        for key, base_name in m.items():
            es, bs = self._shape(key), shapes[base_name]
            if es != bs:
                if (len(es) == len(bs) >= 1 and es[1:] == bs[1:] and is_vocab_param(base_name)):
                    vocab[base_name] = (bs[0], es[0])
                else:
                    raise CheckpointError(
                        f"expert {self.name}: tensor '{key}' in {self._file(key)} has shape "
                        f"{shape_str(es)} but base parameter '{base_name}' has shape {shape_str(bs)}"
                    )
            mapping[base_name] = key
        missing = [n for n in shapes if n not in mapping]
        # a tied output head absent from the checkpoint: the expert's head is its input embedding
        for n in list(missing):
            if n == "lm_head.weight" or n.endswith(".lm_head.weight"):
                emb = next((k for suf in EMBED_CANDIDATES for k in keys if k == suf or k.endswith("." + suf)),
                           None)
                if emb is not None and self._tie and self._shape(emb)[1:] == shapes[n][1:]:
                    mapping[n] = emb
                    es = self._shape(emb)
                    if es != shapes[n]:
                        vocab[n] = (shapes[n][0], es[0])
                    missing.remove(n)
                    logger.info("expert %s: tied %s taken from %s", self.name, n, emb)
                elif not self._tie or emb is None:
                    logger.info("expert %s: %s absent from the checkpoint (tied head)", self.name, n)
        self.mapping = mapping
        self.vocab_mismatch = vocab
        used = set(mapping.values())
        self.unmatched_keys = [p.name for k in keys if k not in used for p in self._virtual.get(k, [Part(k, 0, ())])]
        self.missing_params = missing
        real_unmatched = [k for k in self.unmatched_keys if not k.endswith(_BUFFER_SUFFIXES)]
        if real_unmatched:
            logger.warning("expert %s: %d checkpoint tensor(s) match no base parameter and are ignored: %s",
                           self.name, len(real_unmatched), name_summary(real_unmatched))
        important_missing = [n for n in missing if not n.endswith("lm_head.weight")]
        if important_missing:
            logger.warning("expert %s: %d base parameter(s) absent from the checkpoint (task vector 0): %s",
                           self.name, len(important_missing), name_summary(important_missing))
        for n, (b_rows, e_rows) in vocab.items():
            if self.vocab_reindexed:
                logger.info("expert %s: %s has %d vocabulary rows (base %d); re-indexed to the output tokenizer",
                            self.name, n, e_rows, b_rows)
                continue
            logger.warning(
                "expert %s: vocabulary size differs for %s (base %d rows, expert %d): %s", self.name, n,
                b_rows, e_rows,
                "rows beyond the expert's vocabulary keep the base values" if e_rows < b_rows
                else "the expert's extra rows are ignored")
        self._bound = True

    def _check_bound(self) -> None:
        if not self._bound:
            raise RuntimeError(f"expert {self.name}: call bind(base_param_shapes) first")

    def param_names(self) -> set[str]:
        self._check_bound()
        return set(self.mapping)

    def tensor(self, param_name: str, base: torch.Tensor) -> torch.Tensor | None:
        """The expert's full tensor for ``param_name`` in float32 on ``base.device`` (None if absent).

        On a vocabulary mismatch the result has the base's shape: rows beyond the expert's vocabulary take
        the base's values; expert rows beyond the base's vocabulary are dropped.
        """
        self._check_bound()
        key = self.mapping.get(param_name)
        if key is None:
            return None
        t = self._get(key, device=base.device, dtype=torch.float32)
        if param_name in self.vocab_mismatch:
            out = base.detach().to(dtype=torch.float32, copy=True)
            n = min(out.shape[0], t.shape[0])
            out[:n] = t[:n]
            return out
        if tuple(t.shape) != tuple(base.shape):
            raise CheckpointError(
                f"expert {self.name}: tensor '{key}' has shape {shape_str(t.shape)} but base parameter "
                f"'{param_name}' has shape {shape_str(base.shape)}"
            )
        return t

    def raw_tensor(self, param_name: str, device=None, dtype=torch.float32) -> torch.Tensor | None:
        """The checkpoint's tensor for ``param_name`` as stored, in the expert's own vocabulary (no padding
        or truncation to the base's rows), cast to ``dtype`` on ``device``; None if the expert lacks it.
        Used when an output tokenizer re-indexes the vocabulary tensors."""
        self._check_bound()
        key = self.mapping.get(param_name)
        if key is None:
            return None
        return self._get(key, device=device, dtype=dtype)

    def delta(self, param_name: str, base: torch.Tensor) -> torch.Tensor | None:
        """Task vector ``expert - base`` in float32 on ``base.device`` (None if the expert lacks it).

        On a vocabulary mismatch, computed on the common rows; other rows are 0.
        """
        self._check_bound()
        key = self.mapping.get(param_name)
        if key is None:
            return None
        t = self._get(key, device=base.device, dtype=torch.float32)
        b = base.detach()
        if param_name in self.vocab_mismatch:
            out = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            n = min(out.shape[0], t.shape[0])
            out[:n] = t[:n] - b[:n].float()
            return out
        if tuple(t.shape) != tuple(b.shape):
            raise CheckpointError(
                f"expert {self.name}: tensor '{key}' has shape {shape_str(t.shape)} but base parameter "
                f"'{param_name}' has shape {shape_str(b.shape)}"
            )
        return t.sub_(b) if t.dtype == b.dtype else t - b.float()  # t is a fresh copy: subtract in place

    def range_readable(self, param_name: str) -> bool:
        """Whether :meth:`read_range` serves ``param_name``: the checkpoint has it with the base's shape in
        a format that reads parts of a tensor (plain safetensors)."""
        self._check_bound()
        key = self.mapping.get(param_name)
        return key is not None and param_name not in self.vocab_mismatch and self._readable(key)

    def read_range(self, param_name: str, start: int, stop: int) -> torch.Tensor:
        """The flat entries ``start … stop − 1`` of the expert's tensor for ``param_name`` as stored (1-D)."""
        self._check_bound()
        return self._range(self.mapping[param_name], start, stop)

    def part(self, param_name: str, start: int, stop: int, device=None) -> torch.Tensor | None:
        """The flat entries ``start … stop − 1`` of the expert's tensor for ``param_name`` in float32 on
        ``device`` (None if absent), from any checkpoint format: a slice of a fused parameter reads only
        the tensors that hold it."""
        self._check_bound()
        key = self.mapping.get(param_name)
        if key is None:
            return None
        if param_name in self.vocab_mismatch:
            raise CheckpointError(f"expert {self.name}: parameter '{param_name}' has another vocabulary size; "
                                  "it cannot be read in parts")
        pieces = []
        for name, a, b in self._spans(key, start, stop):
            if self.reader.range_readable(name):
                t = self.reader.get_range(name, a, b)
            elif self.reader.format == "bin":
                t = self.reader.bin_tensor(name).reshape(-1)[a:b]  # a slice of the mmap-ed file
            else:
                t = self.reader.get(name).reshape(-1)[a:b]
            pieces.append(_move(t, device, torch.float32))
        if not pieces:
            return torch.empty(0, dtype=torch.float32, device=device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    # -- checkpoint keys, the parts of a fused parameter included ------------------------------------------
    def _translate(self, keys: list[str], shapes: dict[str, tuple]) -> list[str]:
        """``keys`` with the tensors that make one fused parameter of the expert's architecture (its
        experts stored one tensor per expert and projection, or a renamed tensor: `saved_layout`) replaced
        by that parameter's in-memory name. Checkpoints that store the parameters as they are held in
        memory are left as they are."""
        self._virtual, self._virtual_shapes = {}, {}
        if all(k in shapes for k in keys):
            return keys
        layout, full_shapes = config_saved_layout(self.path)
        if not layout:
            return keys
        owner = {p.name: param for param, parts in layout.items() for p in parts}
        present = set(keys)
        groups: dict[str, list[str]] = {}
        for k in keys:
            if k not in shapes and k in owner and owner[k] not in present:
                groups.setdefault(owner[k], []).append(k)
        consumed: set[str] = set()
        for param in groups:
            parts = layout[param]
            missing = [p.name for p in parts if p.name not in present]
            if missing:
                raise CheckpointError(
                    f"expert {self.name}: checkpoint {self.path} has {len(parts) - len(missing)} of the "
                    f"{len(parts)} tensors that make parameter '{param}' (missing e.g. '{missing[0]}')")
            if any(p.start < 0 for p in parts):
                raise CheckpointError(
                    f"expert {self.name}: tensors such as '{parts[0].name}' in {self.path} are converted into "
                    f"'{param}' by more than a split or a rename; this checkpoint layout is not supported")
            for p in parts:
                got = self.reader.shape(p.name)
                if tuple(got) != tuple(p.shape):
                    raise CheckpointError(
                        f"expert {self.name}: tensor '{p.name}' in {self.reader.file_of(p.name)} has shape "
                        f"{shape_str(got)} but its place in parameter '{param}' has shape {shape_str(p.shape)}")
            self._virtual[param] = parts
            self._virtual_shapes[param] = tuple(full_shapes[param])
            consumed.update(p.name for p in parts)
        if self._virtual:
            logger.info("expert %s: %d tensors read as the %d fused or renamed parameters they make", self.name,
                        len(consumed), len(self._virtual))
        return [k for k in keys if k not in consumed] + list(self._virtual)

    def _spans(self, key: str, start: int, stop: int) -> list[tuple[str, int, int]]:
        """``(checkpoint tensor, first, stop)`` ranges that hold the flat entries ``start … stop − 1`` of
        ``key`` (a checkpoint tensor, or a fused parameter stored in parts)."""
        parts = self._virtual.get(key)
        if parts is None:
            return [(key, start, stop)]
        out = []
        for p in parts:
            a, b = max(start, p.start), min(stop, p.start + p.numel)
            if a < b:
                out.append((p.name, a - p.start, b - p.start))
        return out

    def _shape(self, key: str) -> tuple:
        return self._virtual_shapes[key] if key in self._virtual else self.reader.shape(key)

    def _file(self, key: str) -> Path:
        parts = self._virtual.get(key)
        return self.reader.file_of(parts[0].name if parts else key)

    def _get(self, key: str, device=None, dtype=None) -> torch.Tensor:
        parts = self._virtual.get(key)
        if parts is None:
            return self.reader.get(key, device=device, dtype=dtype)
        out = None
        for p in parts:
            t = self.reader.get(p.name, device=device, dtype=dtype).reshape(-1)
            if out is None:
                out = torch.empty(math.prod(self._virtual_shapes[key]), dtype=t.dtype, device=t.device)
            out[p.start:p.start + p.numel].copy_(t)
            del t
        return out.view(self._virtual_shapes[key])

    def _readable(self, key: str) -> bool:
        return all(self.reader.range_readable(p.name) for p in self._virtual.get(key, [Part(key, 0, ())]))

    def _range(self, key: str, start: int, stop: int) -> torch.Tensor:
        spans = self._spans(key, start, stop) or [(self._virtual[key][0].name, 0, 0)]
        pieces = [self.reader.get_range(name, a, b) for name, a, b in spans]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def factors(self, param_name: str, device=None) -> None:
        """Full fine-tunes have no low-rank factors."""
        return None

    def close(self) -> None:
        self.reader.close()

    def __repr__(self) -> str:
        return f"FullExpert({self.name!r}, {str(self.path)!r})"
