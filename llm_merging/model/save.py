"""Writing merged models: the kit's ``safetensor.pt``, a full Hugging Face directory, or a PEFT adapter.

Every output is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError, LLMMergingError, OutputError
from llm_merging.core.io import (
    TEMP_NAME,
    atomic_path,
    atomic_write_json,
    copy_span,
    host_name,
    remove_path,
    replace_path,
    temp_path,
)
from llm_merging.core.outputs import disk_full, disk_full_message, owner_alive
from llm_merging.model import is_conv1d, vocab_modules
from llm_merging.model.checkpoint import read_safetensors_header, saved_tensors
from llm_merging.model.engine import config_param_shapes
from llm_merging.model.refs import ADAPTER_CONFIG

logger = logging.getLogger(__name__)


def plain_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A view of ``state`` that safetensors accepts: tensors tied to an earlier one (same storage, offset,
    shape and strides) are kept once; tensors that are non-contiguous or share storage with another kept
    tensor are copied; everything else is passed through as it is (no copy of the whole model)."""
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device.type)
        if t.numel() and key in seen:
            logger.info("tensor '%s' is tied to '%s'; saved once", name, seen[key])
            continue
        seen[key] = name
        kept[name] = t
    storages: dict[int, int] = {}
    for t in kept.values():
        ptr = t.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
    out = {}
    for name, t in kept.items():
        shared = t.numel() and storages[t.untyped_storage().data_ptr()] > 1
        t = t.to("cpu")
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
    return out


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Save tensors in safetensors format at ``path`` (atomically; tied/non-contiguous tensors are fine)."""
    from safetensors.torch import save_file

    tensors = plain_state_dict(state)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})


def model_card(info: dict[str, Any]) -> str:
    """A README model card recording how the model was merged."""
    lines = ["---", "library_name: transformers", "tags:", "- merge", "- llm_merging", "---", "",
             f"# {info.get('method', 'merged model')}", "",
             "Merged with [llm_merging](https://github.com/) — no training.", "",
             "## Recipe", "", f"- method: `{info.get('method')}`"]
    base = info.get("base") or {}
    lines.append(f"- base model: `{base.get('id')}`" + (f" @ `{base['revision']}`" if base.get("revision") else ""))
    if base.get("template"):  # merged without a base model: the first model is the template
        lines[-1] += " (no base model: the template, i.e. config, tokenizer and unchanged tensors)"
    lines.append("- models:")
    for e in info.get("experts", []):
        lines.append(f"  - `{e.get('id')}`" + (f" @ `{e['revision']}`" if e.get("revision") else "") + f" ({e.get('kind')})")
    lines += ["", "## Hyperparameters", "", "```json", json.dumps(info.get("hyperparameters", {}), indent=2, default=str), "```", ""]
    return "\n".join(lines)


def save_full(model: torch.nn.Module, tokenizer, output_dir: str | Path, info: dict[str, Any] | None = None,
              max_shard_size: str = "5GB") -> Path:
    """Write an HF ``save_pretrained`` directory (sharded safetensors, config, generation config,
    tokenizer, model card) that ``AutoModel*.from_pretrained`` loads."""
    import sys

    peft = sys.modules.get("peft")  # a PeftModel means peft is imported; importing it only to ask costs ~150 MiB
    if peft is not None and isinstance(model, peft.PeftModel):
        model = model.merge_and_unload()
    output_dir = Path(output_dir)
    with atomic_path(output_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(model_card(info or {}), encoding="utf-8")
    return output_dir


#: bytes per value of each safetensors dtype
SAFETENSORS_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                     "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: tensors kept whole by ``--save adapter`` (modules_to_save) when they change: embeddings and the LM head
EMBEDDING_NAMES = re.compile(r"(^|\.)(embed\w*|wte|wpe|shared|lm_head)(\.|$)")
_ST_FLOATS = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def estimate_saved_bytes(model_dir: str | Path, dtype: torch.dtype | None = None, *,
                         weights_only: bool = False) -> int:
    """About the bytes of the model in ``model_dir`` saved with its floating-point tensors in ``dtype``
    (None: as stored), from its safetensors headers (no weights read), plus its other files (config,
    tokenizer, ...) unless ``weights_only``. Checkpoints without safetensors count their files' sizes,
    scaled from the config's dtype."""
    model_dir = Path(model_dir)
    files = sorted(f for f in model_dir.iterdir() if f.is_file()) if model_dir.is_dir() else []
    tensors = [f for f in files if f.suffix == ".safetensors"]
    out_size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    total = 0
    for f in files:
        if f.suffix in _WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            if f.suffix == ".safetensors" or tensors or f.name.endswith(".index.json"):
                continue
            total += int(f.stat().st_size * (out_size or 2) / _config_size(model_dir))  # .bin and the like
        elif not weights_only:
            total += f.stat().st_size
    for f in tensors:
        for st_dtype, numel in header_values(f).items():
            total += numel * (out_size if out_size and st_dtype in _ST_FLOATS else SAFETENSORS_BYTES.get(st_dtype, 4))
    return total


def header_values(path: str | Path) -> dict[str, int]:
    """The values a safetensors file holds per safetensors dtype (``{"BF16": n, ...}``), from its header
    (no weights read)."""
    out: dict[str, int] = {}
    for info in read_safetensors_header(path).values():
        numel = 1
        for d in info.get("shape", []):
            numel *= int(d)
        out[info.get("dtype")] = out.get(info.get("dtype"), 0) + numel
    return out


def read_adapter_config(path: str | Path) -> dict | None:
    """The ``adapter_config.json`` of the adapter directory ``path``, or None when it is missing, unreadable
    or not a JSON object (loading the adapter, :meth:`llm_merging.model.lora.LoraAdapter.load`, names why)."""
    try:
        config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return config if isinstance(config, dict) else None


def adapter_config_field(expert: dict[str, Any], field: str) -> Any:
    """``field`` of a report's expert entry's (``kind``, ``path``) adapter_config.json; None for a full model
    or when unreadable (the expert's own loading names that problem)."""
    if expert.get("kind") != "lora" or expert.get("path") is None:
        return None
    return (read_adapter_config(expert["path"]) or {}).get(field)


def is_dora(expert: dict[str, Any]) -> bool:
    """Whether a report's expert entry is a LoRA adapter with ``use_dora`` set in its adapter_config.json."""
    return bool(adapter_config_field(expert, "use_dora"))


def fused_expert_tensor(experts: list[dict], base_dir: str | Path, architecture: str) -> tuple[str, tuple] | None:
    """A parameter of 3 or more dimensions (fused mixture-of-experts weights) of the base model in ``base_dir``
    that the experts (report entries: ``kind``, ``path``) change — full fine-tunes, or LoRAs on bare
    parameters (``target_parameters``) —, with its shape: what no PEFT LoRA adapter can hold. None when there
    is none. The base's shapes come from its config alone, read only when an expert may change such a tensor."""
    full = any(e["kind"] == "full" for e in experts)
    targets = [str(t) for e in experts for t in (adapter_config_field(e, "target_parameters") or ())]
    if not full and not targets:
        return None
    for name, shape in config_param_shapes(base_dir, architecture).items():
        if len(shape) >= 3 and (full or any(name == t or name.endswith("." + t) for t in targets)):
            return name, tuple(shape)
    return None


def adapter_bytes(experts: list[dict], rank: int | None) -> int:
    """About the bytes of ``--save adapter``'s float32 factors (:class:`AdapterWriter`), from the input
    adapters' headers (``experts``: their ``path``): at the default rank (the sum of the input ranks) the
    inputs' values; at rank ``rank`` the mean values per unit of rank, times ``rank``."""
    per_rank, total = [], 0
    for e in experts:
        path = Path(e["path"])
        config = read_adapter_config(path)
        if config is None:
            continue
        try:
            values = sum(sum(header_values(f).values()) for f in sorted(path.glob("*.safetensors")))
            r = int(config.get("r") or 1)
        except (OSError, ValueError, TypeError, LLMMergingError):
            continue
        total += 4 * values
        per_rank.append(4 * values / max(r, 1))
    if rank is not None and per_rank:
        return int(sum(per_rank) / len(per_rank) * rank)
    return total


def adapter_estimate(experts: list[dict], base_dir: str | Path, rank: int | None) -> int:
    """About the bytes of ``--save adapter``'s output for the experts (report entries: ``kind``, ``path``)
    over the base model in ``base_dir``; ``rank``: ``--adapter-rank``, else ``--adapter-max-rank``, else None.
    LoRA experts only: :func:`adapter_bytes` from the input adapters' headers (at ``rank``, else the sum of
    the input ranks). With a full fine-tune every weight may change, so from the base checkpoint's headers:
    float32 factors ``r·(m + n)`` per matrix (``r`` the rank, capped at ``min(m, n)``; without a rank, the
    rank at which the factors are as large as the matrix), and every other tensor (embeddings, LM head,
    norms, biases) whole in its own dtype (``modules_to_save``)."""
    if not any(e["kind"] == "full" for e in experts):
        return adapter_bytes(experts, rank)
    base = Path(base_dir)
    files = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    if not files:  # no headers to read: the merged model in float32
        return estimate_saved_bytes(base, torch.float32, weights_only=True)
    total = 0
    for f in files:
        for name, info in read_safetensors_header(f).items():
            shape = [int(d) for d in info.get("shape", [])]
            if len(shape) == 2 and min(shape) > 0 and not EMBEDDING_NAMES.search(name):
                m, n = shape
                r = min(rank or max(1, m * n // (m + n)), m, n)
                total += 4 * r * (m + n)
            else:  # kept whole, in its own dtype
                total += SAFETENSORS_BYTES.get(info.get("dtype"), 4) * math.prod(shape)
    return total


def _config_size(model_dir: Path) -> int:
    """Bytes per value of the dtype a checkpoint's config names (2 when it names none)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 2
    return {"float32": 4, "float64": 8}.get(str(config.get("torch_dtype") or config.get("dtype")), 2)


class NotStreamable(Exception):
    """The model cannot be written tensor by tensor (:class:`StreamingSave`); save it whole instead."""


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_ORDER = ["BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"]  # safetensors' dtype order


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a saved model: its name, its header (length and JSON, padded so that the data
    starts 8-byte aligned, as safetensors writes it), its size and each tensor's place."""

    filename: str
    head: bytes
    size: int
    places: list[tuple[str, int, int]]  # (tensor name, byte offset in the file, bytes), in the file's order


def plan_shards(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], max_shard_size: str | int = "5GB"):
    """The files ``save_pretrained`` writes for ``tensors`` (name -> shape, dtype, in the order it shards
    them): huggingface_hub's ``split_torch_state_dict_into_shards`` and each file's header, tensors in
    safetensors' own order (wider dtypes first, then by name). Returns ``(split, [Shard])``."""
    from huggingface_hub import split_torch_state_dict_into_shards

    for name, (_, dtype) in tensors.items():
        if dtype not in _ST_DTYPES:
            raise ValueError(f"'{name}': dtype {dtype} cannot be saved")
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in tensors.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    shards = []
    for filename, names in split.filename_to_tensors.items():
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        names = sorted(names, key=lambda k: (-_ST_ORDER.index(_ST_DTYPES[tensors[k][1]]), k))
        for key in names:
            shape, dtype = tensors[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        head = len(raw).to_bytes(8, "little") + raw
        places = [(k, len(head) + header[k]["data_offsets"][0],
                   header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) for k in names]
        shards.append(Shard(filename, head, len(head) + offset, places))
    return split, shards


class ShardWriter:
    """A model of known tensors (name -> shape, dtype) written into the directory ``folder`` in any order and
    from several threads at once (each tensor by one): files and index as ``save_pretrained`` splits those
    tensors in that order (:func:`plan_shards`), created at their full size, each tensor put in its place by :meth:`write` (a
    tensor) or :meth:`copy` (bytes of another file, copied by the kernel). :meth:`finish` checks that every
    tensor was written, syncs the files and writes the index; :meth:`close` only closes them."""

    def __init__(self, folder: str | Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 max_shard_size: str | int = "5GB") -> None:
        self.folder = Path(folder)
        self.tensors = {k: (tuple(shape), dtype) for k, (shape, dtype) in tensors.items()}
        self.split, shards = plan_shards(self.tensors, max_shard_size)
        self._fds: list[int] = []
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, byte offset, bytes)
        self._written: set[str] = set()
        try:
            for sh in shards:
                fd = os.open(self.folder / sh.filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, sh.head, 0)
                os.ftruncate(fd, sh.size)
                for name, offset, nbytes in sh.places:
                    self._where[name] = (fd, offset, nbytes)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, value: torch.Tensor) -> None:
        """Tensor ``name``'s values (its shape and dtype exactly)."""
        fd, offset, _ = self._where[name]
        shape, dtype = self.tensors[name]
        if tuple(value.shape) != shape or value.dtype != dtype:
            raise ValueError(f"'{name}': {tuple(value.shape)} {value.dtype} given, {shape} {dtype} expected")
        if value.numel():
            _pwrite_all(fd, value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy(), offset)
        self._written.add(name)

    def copy(self, name: str, path: str | Path, offset: int, nbytes: int) -> None:
        """Tensor ``name``'s bytes from file ``path`` at ``offset`` (exactly its size, in its dtype)."""
        fd, where, size = self._where[name]
        if nbytes != size:
            raise ValueError(f"'{name}': {nbytes} bytes given, {size} expected")
        copy_span(path, offset, fd, where, nbytes)
        self._written.add(name)

    def sync(self) -> None:
        """Flush what is written so far to the disk (:meth:`finish` then has only the rest to flush)."""
        for fd in self._fds:
            os.fsync(fd)

    def finish(self) -> None:
        """Check that every tensor was written, sync and close the files, write the index (several files)."""
        missing = [k for k in self.tensors if k not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} tensors were not written (e.g. '{missing[0]}')")
        self.sync()
        self.close()
        if self.split.is_sharded:
            total = sum(math.prod(shape) for shape, _ in self.tensors.values())
            index = {"metadata": {"total_parameters": total, **self.split.metadata},
                     "weight_map": self.split.tensor_to_filename}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True)
                                                                      + "\n", encoding="utf-8")

    def close(self) -> None:
        """Close the files (idempotent)."""
        _close_fds(self._fds)


class StreamingSave:
    """A ``save_pretrained`` directory written while the engine merges (``--no-eval --save full``): every
    merged value goes straight to its place in the safetensors shards, so the merged model is never held in
    memory. Same files as :func:`save_full` (tensor names after transformers' tied-weight removal and
    weight-conversion reversal, shards and index from ``split_torch_state_dict_into_shards``, config with
    its ``dtype`` and ``architectures``, generation config, tokenizer, model card) and the same bytes.

    ``dtype``: the saved floating-point dtype (a recipe's ``out_dtype``; default the model's). Raises
    :class:`NotStreamable` where that cannot be guaranteed (remote code, weight conversions other than
    renames and splits, unsupported dtypes); fused expert tensors are written as the per-expert tensors
    ``save_pretrained`` writes. Written under a temporary name (``.NAME.MARKER.RAND.tmp``): :meth:`finish`
    renames it into place, :meth:`abort` removes it.

    ``fingerprint`` (the run's inputs and options, JSON values): a journal ``.NAME.MARKER.RAND.journal`` is
    kept beside the temporary directory, one fsync'd line per finished tensor (after its bytes are synced);
    a killed merge can then be continued: ``resume`` (a temporary directory such a merge left, see
    :func:`find_resumable`) is adopted when its journal has the same fingerprint and shard layout, and the
    engine skips the tensors it lists (:meth:`done`). Interrupted by a signal or stopped by the budget
    (:meth:`abort` with a ``KeyboardInterrupt`` or a ``BudgetExceeded``), the directory and journal are kept
    for ``--resume`` (``kept``).
    """

    def __init__(self, model: torch.nn.Module, output_dir: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_size: str = "5GB", fingerprint: dict[str, Any] | None = None,
                 resume: str | Path | None = None) -> None:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        if getattr(model, "is_remote_code", lambda: False)():
            raise NotStreamable("remote-code model")
        self.model, self.dtype = model, dtype
        self.tmp: Path | None = None
        self.journal_path: Path | None = None
        self.kept: Path | None = None  # the directory left for --resume by an interrupted merge
        self.kept_on: str | None = None  # why: "interrupt" (a signal, Ctrl-C) or "budget"
        self.resumed: set[str] = set()  # tensors an interrupted merge had written (skipped by the engine)
        self._journal: int | None = None
        self._finished = False
        self._fds: list[int] = []
        state = model.state_dict()
        self.ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) & set(state)
        for key in self.ignored:  # as save_pretrained drops them (e.g. Marian's sinusoidal positions)
            state.pop(key)
        kept = remove_tied_weights_from_state_dict(dict(state), model)
        by_storage = {_storage_key(t): n for n, t in kept.items() if isinstance(t, torch.Tensor) and t.numel()}
        self.alias = {n: n for n in kept}  # a tied name -> the one saved
        for n, t in state.items():
            if n not in kept and isinstance(t, torch.Tensor) and _storage_key(t) in by_storage:
                self.alias[n] = by_storage[_storage_key(t)]
        self.source = dict(kept)  # the model's values: written for whatever the merge leaves
        placeholders = {}
        for n, t in kept.items():
            out = self._out_dtype(t)
            if out not in _ST_DTYPES:
                raise NotStreamable(f"dtype {out} of '{n}'")
            placeholders[n] = torch.empty(t.shape, dtype=out, device="meta")
        saved = saved_tensors(model)  # transformers' reverse weight conversions: renames, fused experts split
        if saved is None:
            raise NotStreamable("weight conversions on save")  # a conversion that needs real values: save whole
        reverted: dict[str, torch.Tensor] = {}
        inverse: dict[str, tuple[str, int]] = {}  # saved name -> (model name, its first entry there)
        for n, p in saved:  # in the order save_pretrained shards them
            if n not in placeholders:
                continue  # tied or ignored
            if p.start < 0:
                raise NotStreamable(f"weight conversions on save of '{n}'")
            reverted[p.name] = torch.empty(p.shape, dtype=placeholders[n].dtype, device="meta")
            inverse[p.name] = (n, p.start)
        held: dict[str, int] = {}  # entries of each model tensor its saved tensors hold: all of them, once
        for k, (n, _) in inverse.items():
            held[n] = held.get(n, 0) + reverted[k].numel()
        if held != {n: ph.numel() for n, ph in placeholders.items()}:
            raise NotStreamable("weight conversions on save")
        self.saved_name: dict[str, list[str]] = {}  # model name -> the saved tensors it is written as
        for k, (m, _) in inverse.items():
            self.saved_name.setdefault(m, []).append(k)
        self.split, planned = plan_shards({k: (tuple(v.shape), v.dtype) for k, v in reverted.items()}, max_shard_size)
        self.output_dir = Path(output_dir)
        # model name -> [(fd, byte offset, bytes, first entry)]: one place per saved tensor it is written as
        self._where: dict[str, list[tuple[int, int, int, int]]] = {}
        self._done: dict[str, int] = {}
        # (file name, header bytes, total bytes, [(model name, its first entry there, data offset, bytes)])
        shards = [(sh.filename, sh.head, sh.size, [(*inverse[k], offset, nbytes) for k, offset, nbytes in sh.places])
                  for sh in planned]
        self.layout = {f: {"bytes": total, "header_sha256": hashlib.sha256(head).hexdigest()}
                       for f, head, total, _ in shards}
        try:
            if resume is not None:
                self._adopt(Path(resume), fingerprint, shards)
            else:
                self._create(fingerprint, shards)
        except BaseException:
            self.abort()
            raise

    def _create(self, fingerprint, shards) -> None:
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.output_dir)
        self.tmp.mkdir(parents=True)
        for filename, head, total, places in shards:
            fd = os.open(self.tmp / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, head, 0)
            os.ftruncate(fd, total)
            for name, first, offset, nbytes in places:
                self._where.setdefault(name, []).append((fd, offset, nbytes, first))
        if fingerprint is not None:
            self.journal_path = journal_of(self.tmp)
            self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            line = {"journal": JOURNAL_VERSION, "output": self.output_dir.name, "fingerprint": fingerprint,
                    "layout": self.layout}
            os.write(self._journal, (json.dumps(line, sort_keys=True, default=str) + "\n").encode("utf-8"))
            os.fsync(self._journal)

    def _adopt(self, old_tmp: Path, fingerprint, shards) -> None:
        """Continue the merge an interrupted run left in ``old_tmp`` (renamed to this run's marker)."""
        header, done = read_journal(journal_of(old_tmp))
        where = f"--resume: the interrupted merge in {old_tmp.parent}"
        if header is None:
            raise ConfigError(f"{where} has no readable journal; run without --resume to start again")
        differ = fingerprint_differences(header.get("fingerprint") or {}, fingerprint or {})
        if differ:
            raise ConfigError(f"{where} was made with other inputs or options ({', '.join(differ)}); "
                              "run without --resume to start again")
        if header.get("layout") != self.layout:
            raise ConfigError(f"{where} has another shard layout; run without --resume to start again")
        for filename, head, total, _ in shards:
            path = old_tmp / filename
            try:
                ok = path.stat().st_size == total and path.open("rb").read(len(head)) == head
            except OSError:
                ok = False
            if not ok:
                raise ConfigError(f"{where}: its shard {filename} is not the one its journal describes; "
                                  "run without --resume to start again")
        self.tmp = temp_path(self.output_dir)
        self.journal_path = journal_of(self.tmp)
        os.replace(journal_of(old_tmp), self.journal_path)  # this run's marker from now on
        os.replace(old_tmp, self.tmp)
        for filename, head, total, places in shards:
            fd = os.open(self.tmp / filename, os.O_RDWR)
            self._fds.append(fd)
            for name, first, offset, nbytes in places:
                self._where.setdefault(name, []).append((fd, offset, nbytes, first))
        self.resumed = {n for n in done if n in self._where}
        for name in self.resumed:
            self._done[name] = self._bytes(name)
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        logger.info("resuming the merge written in %s: %d of %d tensors are done", self.tmp, len(self.resumed),
                    len(self._where))

    def _out_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

    def _bytes(self, name: str) -> int:
        """The bytes model tensor ``name`` takes in the shards (over the saved tensors it is written as)."""
        return sum(w[2] for w in self._where[name])

    def done(self, name: str) -> bool:
        """Whether an interrupted run already wrote tensor ``name`` (``--resume``: the engine skips it)."""
        return self.alias.get(name, name) in self.resumed

    def put(self, name: str, start: int, values: torch.Tensor) -> None:
        """Write ``values`` (flat, any dtype: cast to the saved one) as the entries ``start …`` of ``name``
        (a model parameter or buffer name; tied names resolve to the saved one). A tensor's last entries
        written, it is synced and journalled."""
        if name in self.ignored:
            return  # not saved (save_pretrained drops it too)
        name = self.alias.get(name, name)
        v = values.detach().reshape(-1).to(device="cpu", dtype=self._out_dtype(self.source[name]))
        raw = v.contiguous().view(torch.uint8).numpy()
        size = v.element_size()
        if (start + v.numel()) * size > self._bytes(name):
            raise ValueError(f"'{name}': entries {start}…{start + v.numel()} are past its end")
        for fd, offset, nbytes, first in self._where[name]:  # each saved tensor the range overlaps
            a, b = max(start, first), min(start + v.numel(), first + nbytes // size)
            if a < b:
                _pwrite_all(fd, raw[(a - start) * size:(b - start) * size], offset + (a - first) * size)
        self._done[name] = self._done.get(name, 0) + raw.nbytes
        if self._journal is not None and self._done[name] == self._bytes(name):
            for fd in {w[0] for w in self._where[name]}:
                os.fdatasync(fd)  # the tensor's bytes are on disk before the journal says so
            os.write(self._journal, (json.dumps({"done": name}) + "\n").encode("utf-8"))
            os.fsync(self._journal)

    def finish(self, tokenizer, info: dict[str, Any] | None = None) -> Path:
        """Write what the merge did not (tensors it left as they are), the index, config, generation config,
        tokenizer and model card; rename the directory into place."""
        try:
            self._close_journal()  # the rest is quick to redo: a resumed run rewrites it
            for name, t in self.source.items():
                done = self._done.get(name, 0)
                if done == 0:
                    flat = t.detach().reshape(-1)
                    step = max(1, (64 << 20) // max(1, flat.element_size()))
                    for s in range(0, flat.numel(), step):  # in pieces: no whole-tensor copy for a dtype cast
                        self.put(name, s, flat[s:s + step])
                elif done != self._bytes(name):
                    raise ValueError(f"'{name}': {done} of {self._bytes(name)} bytes were written")
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            if self.split.is_sharded:
                index = {"metadata": {"total_parameters": self.model.num_parameters(), **self.split.metadata},
                         "weight_map": self.split.tensor_to_filename}
                (self.tmp / "model.safetensors.index.json").write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            config = self.model.config
            dtype = self.dtype or self.model.dtype
            config.dtype = str(dtype).split(".")[1]
            config.architectures = [type(self.model).__name__]
            config.save_pretrained(str(self.tmp))
            if self.model.can_generate():
                self.model.generation_config.save_pretrained(str(self.tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(self.tmp))
            (self.tmp / "README.md").write_text(model_card(info or {}), encoding="utf-8")
            replace_path(self.tmp, self.output_dir)
            self._finished = True
            self.tmp = None
            if self.journal_path is not None:
                remove_path(self.journal_path)
        except BaseException as exc:
            self.abort(exc)
            raise
        return self.output_dir

    def _close_journal(self) -> None:
        if self._journal is not None:
            try:
                os.close(self._journal)
            except OSError:
                pass
            self._journal = None

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the partly written directory and its journal (nothing is left behind), except after an
        interrupt or a budget stop (``exc`` a KeyboardInterrupt or a BudgetExceeded) when tensors are
        journalled: then both stay for ``--resume`` (``kept``). Idempotent."""
        _close_fds(self._fds)
        self._close_journal()
        if self._finished or self.tmp is None:
            return
        resumable = self.journal_path is not None and read_journal(self.journal_path)[1]
        if isinstance(exc, (KeyboardInterrupt, BudgetExceeded)) and resumable:
            self.kept, self.tmp = self.tmp, None
            self.kept_on = "budget" if isinstance(exc, BudgetExceeded) else "interrupt"
            how = ("the same command with a larger --time-budget and --resume" if isinstance(exc, BudgetExceeded)
                   else "the same command with --resume")
            logger.warning("%s: the %d tensors merged so far are kept in %s; %s continues the merge",
                           "budget spent" if isinstance(exc, BudgetExceeded) else "interrupted", len(resumable),
                           self.kept, how)
            return
        remove_path(self.tmp)
        if self.journal_path is not None:
            remove_path(self.journal_path)
        self.tmp = None


#: the format of a streamed merge's journal (its first line says it)
JOURNAL_VERSION = 1


def journal_of(tmp: Path) -> Path:
    """The journal beside a streamed merge's temporary directory ``.NAME.MARKER.RAND.tmp``."""
    return tmp.with_name(tmp.name[: -len(".tmp")] + ".journal")


def read_journal(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """A streamed merge's journal: its header (None when missing or unreadable) and the finished tensors
    (a torn last line, from a kill while it was written, is ignored)."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError:
        return None, []
    try:
        header = json.loads(lines[0])
    except (ValueError, IndexError):
        return None, []
    if not isinstance(header, dict) or header.get("journal") != JOURNAL_VERSION:
        return None, []
    done = []
    for raw in lines[1:]:
        try:
            done.append(json.loads(raw)["done"])
        except (ValueError, KeyError, TypeError):
            break
    return header, done


def find_resumable(folder: Path, name: str, *, any_host: bool = False) -> list[dict[str, Any]]:
    """The merges into ``folder/name`` that a stopped run left behind with a journal, most finished tensors
    first: ``{"path", "journal", "header", "done", "pid", "host", "live"}``. ``live``: its process may still
    run, so it must not be continued: a running process of this host, or (unless ``any_host``) any process of
    another host, which this one cannot see. ``any_host`` only once this run holds the folder's lock, which
    no live run of ours lets go of (on NFS, as far as the lock reaches other hosts)."""
    found = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    for entry in entries:
        m = TEMP_NAME.match(entry)
        if m is None or m["kind"] != "tmp" or m["name"] != name or not (Path(folder) / entry).is_dir():
            continue
        path = Path(folder) / entry
        header, done = read_journal(journal_of(path))
        if header is None:
            continue
        pid, start, host = int(m["pid"]), int(m["start"]), m["host"]
        live = owner_alive(pid, start, host) and not (any_host and host != host_name())
        found.append({"path": path, "journal": journal_of(path), "header": header, "done": len(done),
                      "pid": pid, "host": host, "live": live})
    return sorted(found, key=lambda r: -r["done"])


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys (``models.expert 1.files`` style, at most two levels) whose values differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out += sub or [key]
        else:
            out.append(key)
    return out


def _pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most ~2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"cannot write to the saved model (pwrite returned {n})")
        view, offset = view[n:], offset + n


def _close_fds(fds: list[int]) -> None:
    """Close every file descriptor of ``fds`` (errors ignored) and empty the list."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device.type)


#: the per-module report written next to an adapter by :class:`AdapterWriter`
EXTRACT_REPORT = "extract_report.json"
#: how :class:`AdapterWriter` carries changed input embeddings and output heads
EMBEDDING_MODES = ("keep", "low-rank")


def _dense(module) -> bool:
    """A layer PEFT LoRA targets with ``lora_A`` / ``lora_B``: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def _positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _balanced(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p q`` rescaled so that column j of ``p`` and row j of ``q`` have the same norm (√σⱼ for SVD
    factors): the product is unchanged and both factors keep the same range (kinder to half precision)."""
    scale = torch.sqrt(p.norm(dim=0) / q.norm(dim=1).clamp_min(1e-30))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (p / scale).contiguous(), (q * scale[:, None]).contiguous()


class LazyTensor:
    """A tensor of known ``shape`` and ``dtype`` that ``fetch()`` reads when it is written (the tensors an
    extraction keeps whole are not held in memory meanwhile)."""

    __slots__ = ("fetch", "shape", "dtype")

    def __init__(self, fetch, shape, dtype: torch.dtype) -> None:
        self.fetch, self.shape, self.dtype = fetch, torch.Size(shape), dtype


def write_safetensors(path: str | Path, tensors: dict[str, "torch.Tensor | LazyTensor"]) -> None:
    """Write a safetensors file tensor by tensor (header first, from the shapes and dtypes; then each
    tensor's bytes, a :class:`LazyTensor` read just then): no copy of the whole content in memory, and a
    tensor saved under several names is written once per name. Synced before it returns."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"'{name}': dtype {t.dtype} cannot be saved")
        size = t.shape.numel() * torch.empty((), dtype=t.dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, t in tensors.items():
            v = t.fetch() if isinstance(t, LazyTensor) else t
            if tuple(v.shape) != tuple(t.shape) or v.dtype != t.dtype:
                raise ValueError(f"'{name}': read {tuple(v.shape)} {v.dtype}, expected {tuple(t.shape)} {t.dtype}")
            if v.numel():
                fh.write(memoryview(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
            del v
        fh.flush()
        os.fsync(fh.fileno())


def adapter_card(info: dict[str, Any], report: dict[str, Any], base_model_name: str) -> str:
    """README of a written adapter: PEFT front matter, the recipe (:func:`model_card`) and the extraction
    summary (rank rule, ranks, errors, what is kept exactly)."""
    totals, rule = report["totals"], report["rule"]
    recipe = model_card(info).split("---", 2)[-1].lstrip("\n")
    lines = ["---", f"base_model: {base_model_name}", "library_name: peft", "tags:", "- lora", "- llm_merging",
             "---", "", recipe, "## Adapter", "",
             f"- rank rule: {rule['rule']}",
             f"- LoRA modules: {totals['lora_modules']} (rank {totals['rank_min']}–{totals['rank_max']}, "
             f"most common {totals['rank']})",
             f"- relative Frobenius error of ΔW: {totals['relative_error']:.3g} overall, "
             f"{totals['max_relative_error']:.3g} at worst (`{totals['worst_module']}`)",
             f"- kept exactly (modules_to_save): {', '.join(f'`{m}`' for m in report['modules_to_save']) or 'none'}",
             f"- changed biases (PEFT bias=\"all\"): {totals['biases']}",
             "", f"Per-module ranks and errors: `{EXTRACT_REPORT}`.", ""]
    return "\n".join(lines)


class AdapterWriter:
    """Collect the merged ΔW of every parameter (``__call__``, the engine's ``delta_sink``) and write a PEFT
    LoRA adapter that reproduces base + ΔW (:meth:`save`). Also the writer of ``llm-merging extract-lora``.

    Per changed tensor:

    * a matrix of a ``Linear`` / ``Conv1D`` layer: LoRA factors (``lora_A`` / ``lora_B``) of rank ``rank``
      (capped at the matrix's min(out, in)) or of the smallest rank keeping fraction ``energy`` of
      ‖ΔW‖_F² (at most ``max_rank``), from :func:`llm_merging.ops.extract_low_rank`; with neither, and
      only LoRA experts, the sum of the input adapters' ranks for that module (capped at ``max_rank``):
      exact for methods that combine the ΔWᵢ linearly; a layer no input adapter factors is kept exactly.
      Different ranks go to ``rank_pattern`` / ``alpha_pattern`` (alpha = rank: scale 1);
    * the input embedding and output head: kept exactly (``embeddings="keep"``) or as LoRA factors
      (``"low-rank"``: ``lora_embedding_A`` / ``lora_embedding_B`` for ``nn.Embedding``); a weight tied
      to several modules is always kept exactly, written for every module that shares it (PEFT's
      ``merge_and_unload`` would add each module's LoRA factors to the one shared weight);
    * the bias of a ``Linear`` / ``Conv1D`` layer: the new bias itself under PEFT's ``bias="all"``
      (``<layer>.base_layer.bias`` for a LoRA layer, ``<layer>.bias`` otherwise), which PEFT loads into the
      layer exactly;
    * anything else (norm weights and biases, other parameters): the whole owning module in PEFT's
      ``modules_to_save`` with all its tensors (saved as ``<module>.<tensor>``, as PEFT saves them; a
      module whose name ends another module's name is left out of the list, which PEFT matches by suffix,
      and its tensors load into the base module directly);
    * a tensor of 3 or more dimensions (fused MoE experts, convolutions): ConfigError (no PEFT LoRA layer
      holds it).

    ``errors``: the relative Frobenius error ‖ΔW − BA‖/‖ΔW‖ of every LoRA module; :meth:`report` adds the
    ranks, the modules kept exactly and the totals (also written as ``extract_report.json``), with a warning
    above 1 %. ``svd``: the :func:`~llm_merging.ops.low_rank` method (``auto``: randomized when the rank is
    far below the size). Factors are saved in ``dtype`` (float32 by default; the errors include its
    rounding); kept tensors keep their own dtype.
    """

    def __init__(self, rank: int | None = None, energy: float | None = None, max_rank: int | None = None,
                 svd: str = "auto", *, embeddings: str = "keep", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        self.rank = _positive_int(rank, "adapter rank")
        self.max_rank = _positive_int(max_rank, "adapter max rank")
        if energy is not None:
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
                raise ConfigError(f"adapter energy: {energy!r} is outside (0, 1]")
            energy = float(energy)
        if self.rank is not None and energy is not None:
            raise ConfigError("adapter rank and adapter energy: give one of them, not both")
        if self.rank is not None and self.max_rank is not None:
            raise ConfigError("adapter max rank: applies with an energy or the summed input ranks, not with a fixed rank")
        if svd not in ("auto", "full", "randomized"):
            raise ConfigError(f"adapter svd: {svd!r} is not one of 'auto', 'full', 'randomized'")
        if embeddings not in EMBEDDING_MODES:
            raise ConfigError(f"embeddings: {embeddings!r} is not one of {', '.join(EMBEDDING_MODES)}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"adapter dtype: {dtype!r} is not float32, bfloat16 or float16")
        self.energy, self.svd, self.embeddings, self.dtype, self.seed = energy, svd, embeddings, dtype, int(seed)
        self.label = "--save adapter"  # how error messages name the caller, and what they suggest instead
        self.fallback = "use --save full"
        self.model = None
        self.experts: list = []
        self.modules: dict = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> PEFT (B, A), float32 CPU
        self.errors: dict[str, float] = {}  # relative Frobenius error of the truncation, per LoRA module
        self.ranks: dict[str, int] = {}
        self.embedding_modules: set[str] = set()  # LoRA modules that are nn.Embedding (lora_embedding_A/B)
        self.kept: dict[str, torch.Tensor | None] = {}  # changed tensor of a kept module -> value (None: the model's)
        self.keep_modules: dict[str, None] = {}  # modules_to_save, in order
        self.biases: dict[str, torch.Tensor | None] = {}  # changed dense-layer bias -> value (None: the model's)
        self.skipped: list[str] = []
        self.fan_in_fan_out: bool | None = None
        self._shape: dict[str, tuple[int, int]] = {}
        self._sq_norm: dict[str, float] = {}
        self._aliases: dict[str, list[str]] = {}
        self._vocab_modules: set[str] = set()
        self._read = None

    # ------------------------------------------------------------------------------------------------
    def bind(self, model: torch.nn.Module, experts: list, read=None) -> "AdapterWriter":
        """Attach the model being merged (its module types; on the meta device for an extraction) and the
        experts, before the merge runs. ``read(name)`` (optional): the base value of a tensor, for the
        unchanged tensors of a kept module when the model holds no values (meta device)."""
        if self.rank is None and self.energy is None:
            full = [e for e in experts if e.kind == "full"]
            if full:
                raise ConfigError(f"{self.label}: '{getattr(full[0], 'name', full[0])}' is a full fine-tune; choose "
                                  "the adapter's rank with --adapter-rank R or --adapter-energy E")
        self.model, self.experts, self._read = model, list(experts), read
        self.modules = dict(model.named_modules())
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self._aliases = {n: names for names in groups.values() for n in names}
        vocab = vocab_modules(model)
        self._vocab_modules = {n for n, m in self.modules.items() if any(m is v for v in vocab)}
        return self

    def _input_ranks(self, name: str) -> list[int]:
        out = []
        for e in self.experts:
            if e.kind == "lora":
                f = e.factors(name)
                if f is not None:
                    out.append(int(f[1].shape[0]))
        return out

    def _route(self, name: str, shape: tuple) -> tuple[str, list, int | None]:
        """Where a changed tensor goes: ("lora" | "keep" | "bias", its owners (alias, module name, leaf,
        module) — several for a tied weight —, the fixed rank or None)."""
        if self.model is None:
            raise RuntimeError("AdapterWriter.bind(model, experts) must come first")
        if len(shape) >= 3:
            raise ConfigError(f"{self.label}: parameter '{name}' is a {len(shape)}-D tensor {tuple(shape)} "
                              f"(fused experts or a convolution) that a PEFT LoRA adapter cannot hold; {self.fallback}")
        owners = []
        for alias in self._aliases.get(name, [name]):
            module_name, _, leaf = alias.rpartition(".")
            module = self.modules.get(module_name)
            if not module_name or module is None:
                raise ConfigError(f"{self.label}: parameter '{alias}' belongs to no submodule, which a PEFT adapter "
                                  f"cannot carry; {self.fallback}")
            owners.append((alias, module_name, leaf, module))
        leaf = owners[0][2]
        if leaf == "bias" and len(shape) == 1 and all(_dense(o[3]) for o in owners):
            return "bias", owners, None
        low_rank = len(shape) == 2 and leaf == "weight" and all(
            _dense(o[3]) or isinstance(o[3], torch.nn.Embedding) for o in owners)
        rank = self.rank
        if low_rank and self.rank is None and self.energy is None:  # only LoRA experts: their summed rank
            inputs = self._input_ranks(name)
            low_rank = bool(inputs)
            rank = sum(inputs) if inputs else None
            if rank is not None and self.max_rank is not None:
                rank = min(rank, self.max_rank)
        elif low_rank and self.embeddings == "keep":
            low_rank = not any(o[1] in self._vocab_modules or isinstance(o[3], torch.nn.Embedding) for o in owners)
        if low_rank and len(owners) > 1:  # tied: PEFT's merge_and_unload would add each module's LoRA to the one weight
            logger.info("%s: '%s' is tied to %s: kept whole (modules_to_save)", self.label, name,
                        ", ".join(f"'{o[0]}'" for o in owners[1:]))
            low_rank = False
        return ("lora" if low_rank else "keep"), owners, rank

    def plan(self, name: str, shape: tuple) -> str:
        """What a change of parameter ``name`` (of ``shape``) becomes: ``"lora"`` (factors), ``"keep"``
        (its module in ``modules_to_save``) or ``"bias"``; ConfigError where no PEFT adapter can hold it."""
        return self._route(name, tuple(shape))[0]

    def keep(self, name: str, value: "torch.Tensor | LazyTensor") -> None:
        """Record the new value of a changed parameter that :meth:`plan` does not factor (``"keep"`` or
        ``"bias"``), without its ΔW; a :class:`LazyTensor` is read only when the adapter is written."""
        kind, owners, _ = self._route(name, tuple(value.shape))
        if kind == "lora":
            raise ValueError(f"'{name}' is written as LoRA factors: give its ΔW")
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu")
        self._record(kind, owners, value)

    def _record(self, kind: str, owners: list, value: "torch.Tensor | LazyTensor | None") -> None:
        """Note a tensor kept whole (``kind`` "bias" or a module's weight) for each of its ``owners``;
        ``value`` None: read from the model when the adapter is saved."""
        for alias, mod, _, _ in owners:
            if kind == "bias":
                self.biases[alias] = value
            else:
                self.keep_modules.setdefault(mod)
                self.kept[alias] = value

    def __call__(self, name: str, delta: torch.Tensor, value: "torch.Tensor | LazyTensor | None" = None) -> None:
        """Take the merged ΔW of parameter ``name`` (its shape; any device). ``value`` (optional): the new
        tensor itself (base + ΔW, as it is to be saved), used for what is kept exactly; without it the
        model's tensor is read when the adapter is saved (the engine has merged it by then)."""
        if not bool(torch.count_nonzero(delta)):
            return
        kind, owners, rank = self._route(name, tuple(delta.shape))
        if kind != "lora":
            if value is None:
                self._record(kind, owners, None)
            else:
                self.keep(name, value)
            return
        if rank is not None:
            b, a, err, r = ops.extract_low_rank(delta, rank=min(rank, *delta.shape), method=self.svd, seed=self.seed)
        else:
            b, a, err, r = ops.extract_low_rank(delta, energy=self.energy, max_rank=self.max_rank, method=self.svd,
                                                seed=self.seed)
        p, q = _balanced(b, a)  # delta ≈ p @ q in the parameter's own layout
        sq = float(torch.linalg.matrix_norm(delta.float())) ** 2
        if self.dtype != torch.float32:  # the error of the factors as saved
            p, q = p.to(self.dtype), q.to(self.dtype)
            err = float(torch.linalg.matrix_norm(delta.float() - p.float() @ q.float())) / sq ** 0.5
        p, q = p.cpu(), q.cpu()
        for alias, mod, _, module in owners:
            transposed = isinstance(module, torch.nn.Embedding) or is_conv1d(module)  # stored (in, out)
            self.factors[mod] = (q.t().contiguous(), p.t().contiguous()) if transposed else (p, q)
            if isinstance(module, torch.nn.Embedding):
                self.embedding_modules.add(mod)
            elif self.fan_in_fan_out is None or is_conv1d(module):
                self.fan_in_fan_out = is_conv1d(module)
            self.errors[mod], self.ranks[mod], self._sq_norm[mod] = err, r, sq
            b_, a_ = self.factors[mod]
            self._shape[mod] = (int(b_.shape[0]), int(a_.shape[1]))

    # ------------------------------------------------------------------------------------------------
    def _kept_modules(self) -> list[str]:
        """The modules to save whole: outermost only; none may hold a LoRA layer."""
        mods = list(self.keep_modules)
        outer = [m for m in mods if not any(m != o and m.startswith(o + ".") for o in mods)]
        for m in outer:
            inner = next((t for t in self.factors if t == m or t.startswith(m + ".")), None)
            if inner is not None:
                raise ConfigError(f"{self.label}: module '{m}' must be saved whole (a changed tensor of it is not a "
                                  f"LoRA matrix) but it contains the LoRA layer '{inner}'; {self.fallback}")
        return outer

    def _tensor(self, name: str, recorded: dict) -> "torch.Tensor | LazyTensor":
        value = recorded.get(name)
        if value is not None:
            return value
        module_name, _, leaf = name.rpartition(".")
        t = self.modules[module_name].state_dict(keep_vars=True).get(leaf) if module_name in self.modules else None
        if t is not None and t.device.type != "meta":
            return t.detach().to("cpu")
        if self._read is not None:
            return self._read(name)
        raise ConfigError(f"{self.label}: no value for tensor '{name}'")

    def report(self) -> dict[str, Any]:
        """Per-module rank and relative error, the modules kept exactly and the totals (JSON values)."""
        if self.rank is not None:
            rule = f"rank {self.rank} (capped at each matrix's size)"
        elif self.energy is not None:
            rule = (f"energy {self.energy:g}: the smallest rank keeping this fraction of ‖ΔW‖_F²"
                    + (f", at most {self.max_rank}" if self.max_rank else ""))
        else:
            rule = "sum of the input adapters' ranks" + (f", at most {self.max_rank}" if self.max_rank else "")
        modules = {m: {"kind": "lora_embedding" if m in self.embedding_modules else "lora",
                       "shape": list(self._shape[m]), "rank": self.ranks[m],
                       "relative_error": self.errors[m]} for m in sorted(self.factors)}
        ranks = list(self.ranks.values())
        total_sq = sum(self._sq_norm.values())
        err_sq = sum(self.errors[m] ** 2 * self._sq_norm[m] for m in self.factors)
        worst = max(self.errors, key=self.errors.get) if self.errors else None
        kept = [m for m in self.keep_modules]
        return {
            "rule": {"rule": rule, "rank": self.rank, "energy": self.energy, "max_rank": self.max_rank,
                     "svd": self.svd, "embeddings": self.embeddings},
            "modules": modules,
            "modules_to_save": kept,
            "kept_tensors": sorted(self.kept),
            "biases": sorted(self.biases),
            "totals": {
                "lora_modules": len(self.factors), "modules_to_save": len(kept), "biases": len(self.biases),
                "rank": max(set(ranks), key=ranks.count) if ranks else 0,
                "rank_min": min(ranks, default=0), "rank_max": max(ranks, default=0),
                "relative_error": (err_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
                "max_relative_error": self.errors[worst] if worst else 0.0, "worst_module": worst,
                "lora_parameters": sum(r * sum(self._shape[m]) for m, r in self.ranks.items()),
            },
        }

    def save(self, output_dir: str | Path, base_model_name: str, info: dict[str, Any] | None = None) -> Path:
        """Write the adapter directory atomically (``adapter_model.safetensors``, ``adapter_config.json``,
        ``extract_report.json``, README model card); a full disk raises OutputError and leaves nothing."""
        if not self.factors:
            if self.kept or self.biases:
                raise ConfigError(f"{self.label}: no weight matrix changed (only "
                                  f"{', '.join(sorted(self.kept) + sorted(self.biases))[:200]}), and a PEFT LoRA "
                                  f"adapter needs at least one LoRA layer; {self.fallback}")
            raise ConfigError(f"{self.label}: no parameter differs from the base model; there is no adapter to write")
        kept_modules = self._kept_modules()
        report = self.report()
        worst = report["totals"]["worst_module"]
        if self.errors[worst] > 0.01:
            logger.warning("%s: the rank-limited adapter differs from %s by up to %.1f%% (relative Frobenius error, "
                           "%s); raise the rank or energy, or %s", self.label,
                           "the fine-tune" if self.label == "extract-lora" else "the merged model",
                           100 * self.errors[worst], worst,
                           self.fallback + " (trimming methods such as TIES or DARE make ΔW full rank)"
                           if self.label == "--save adapter" else self.fallback)
        ranks = report["totals"]["rank"]
        pattern = {m: k for m, k in sorted(self.ranks.items()) if k != ranks}
        names = list(self.modules)
        mts = []
        for m in kept_modules:  # PEFT wraps every module whose name ends with an entry (plain string match)
            if any(n != m and n.endswith(m) for n in names):
                # listed, it would also wrap the other module and fail to load; unlisted, its saved tensors
                # load straight into the base module (as PEFT's bias="all" does)
                logger.info("%s: module '%s' is a suffix of another module's name: its tensors load into the base "
                            "module directly instead of through modules_to_save", self.label, m)
            else:
                mts.append(m)
        tensors: dict[str, torch.Tensor] = {}
        for m, (b, a) in self.factors.items():
            if m in self.embedding_modules:
                tensors[f"base_model.model.{m}.lora_embedding_A"] = a
                tensors[f"base_model.model.{m}.lora_embedding_B"] = b
            else:
                tensors[f"base_model.model.{m}.lora_A.weight"] = a
                tensors[f"base_model.model.{m}.lora_B.weight"] = b
        bias_keys = False
        recorded = {**self.biases, **self.kept}  # a kept module's changed bias is saved with it
        for m in kept_modules:
            for leaf in self.modules[m].state_dict(keep_vars=True):
                tensors[f"base_model.model.{m}.{leaf}"] = self._tensor(f"{m}.{leaf}", recorded)
        for name in self.biases:
            mod = name.rpartition(".")[0]
            if any(mod == k or mod.startswith(k + ".") for k in kept_modules):
                continue  # saved with its module
            key = f"{mod}.base_layer.bias" if mod in self.factors else name
            tensors[f"base_model.model.{key}"] = self._tensor(name, self.biases)
            bias_keys = True
        task = "SEQ_2_SEQ_LM" if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"
        config = {
            "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name,
            "r": ranks, "lora_alpha": ranks, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(self.factors), "fan_in_fan_out": bool(self.fan_in_fan_out),
            "lora_dropout": 0.0, "bias": "all" if bias_keys else "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": mts or None, "inference_mode": True, "init_lora_weights": True,
        }
        output_dir = Path(output_dir)
        try:
            with atomic_path(output_dir) as tmp:
                tmp.mkdir(parents=True)
                write_safetensors(tmp / "adapter_model.safetensors", tensors)
                atomic_write_json(tmp / "adapter_config.json", config)
                atomic_write_json(tmp / EXTRACT_REPORT, report)
                (tmp / "README.md").write_text(adapter_card(info or {}, report, base_model_name), encoding="utf-8")
        except OSError as exc:
            if disk_full(exc):
                raise OutputError(disk_full_message(exc, output_dir)) from None
            raise
        return output_dir
