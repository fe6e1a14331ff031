"""Writing merged models: the kit's ``safetensor.pt``, a full Hugging Face directory, or a PEFT adapter.

Every output is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError, LLMMergingError
from llm_merging.core.io import TEMP_NAME, atomic_path, atomic_write_json, host_name, remove_path, replace_path, temp_path
from llm_merging.core.outputs import owner_alive
from llm_merging.model import is_conv1d
from llm_merging.model.checkpoint import read_safetensors_header

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


_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
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
            total += numel * (out_size if out_size and st_dtype in _ST_FLOATS else _ST_BYTES.get(st_dtype, 4))
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


def adapter_bytes(experts: list[dict], rank: int | None) -> int:
    """About the bytes of ``--save adapter``'s float32 factors (:class:`AdapterWriter`), from the input
    adapters' headers (``experts``: their ``path``): at the default rank (the sum of the input ranks) the
    inputs' values; at rank ``rank`` the mean values per unit of rank, times ``rank``."""
    per_rank, total = [], 0
    for e in experts:
        path = Path(e["path"])
        try:
            values = sum(sum(header_values(f).values()) for f in sorted(path.glob("*.safetensors")))
            r = int(json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r") or 1)
        except (OSError, ValueError, TypeError, LLMMergingError):
            continue
        total += 4 * values
        per_rank.append(4 * values / max(r, 1))
    if rank is not None and per_rank:
        return int(sum(per_rank) / len(per_rank) * rank)
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


class StreamingSave:
    """A ``save_pretrained`` directory written while the engine merges (``--no-eval --save full``): every
    merged value goes straight to its place in the safetensors shards, so the merged model is never held in
    memory. Same files as :func:`save_full` (tensor names after transformers' tied-weight removal and
    weight-conversion reversal, shards and index from ``split_torch_state_dict_into_shards``, config with
    its ``dtype`` and ``architectures``, generation config, tokenizer, model card) and the same bytes.

    ``dtype``: the saved floating-point dtype (a recipe's ``out_dtype``; default the model's). Raises
    :class:`NotStreamable` where that cannot be guaranteed (remote code, weight converters, unsupported
    dtypes). Written under a temporary name (``.NAME.MARKER.RAND.tmp``): :meth:`finish` renames it into
    place, :meth:`abort` removes it.

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
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.core_model_loading import revert_weight_conversion
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
        ids = {id(v): n for n, v in placeholders.items()}
        try:
            reverted = revert_weight_conversion(model, dict(placeholders))
        except Exception as exc:  # a conversion that needs real values: save whole
            raise NotStreamable(f"weight conversions on save ({type(exc).__name__})") from None
        if len(reverted) != len(placeholders) or any(id(v) not in ids for v in reverted.values()):
            raise NotStreamable("weight conversions on save")  # converters build new tensors: save whole
        self.saved_name = {ids[id(v)]: k for k, v in reverted.items()}
        self.split = split_torch_state_dict_into_shards(reverted, filename_pattern="model{suffix}.safetensors",
                                                        max_shard_size=max_shard_size)
        self.output_dir = Path(output_dir)
        self._where: dict[str, tuple[int, int, int]] = {}  # model name -> (fd, byte offset, bytes)
        self._done: dict[str, int] = {}
        inverse = {v: k for k, v in self.saved_name.items()}
        shards = []  # (file name, header bytes, total bytes, [(model name, data offset, bytes)])
        for filename, names in self.split.filename_to_tensors.items():
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            names = sorted(names, key=lambda k: (-_ST_ORDER.index(_ST_DTYPES[reverted[k].dtype]), k))
            for key in names:  # in safetensors' own order: wider dtypes first, then by name
                ph = reverted[key]
                size = ph.numel() * ph.element_size()
                header[key] = {"dtype": _ST_DTYPES[ph.dtype], "shape": list(ph.shape),
                               "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
            head = len(raw).to_bytes(8, "little") + raw
            places = [(inverse[k], len(head) + header[k]["data_offsets"][0],
                       header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) for k in names]
            shards.append((filename, head, len(head) + offset, places))
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
            for name, offset, nbytes in places:
                self._where[name] = (fd, offset, nbytes)
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
            for name, offset, nbytes in places:
                self._where[name] = (fd, offset, nbytes)
        self.resumed = {n for n in done if n in self._where}
        for name in self.resumed:
            self._done[name] = self._where[name][2]
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        logger.info("resuming the merge written in %s: %d of %d tensors are done", self.tmp, len(self.resumed),
                    len(self._where))

    def _out_dtype(self, t: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype

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
        fd, offset, nbytes = self._where[name]
        v = values.detach().reshape(-1).to(device="cpu", dtype=self._out_dtype(self.source[name]))
        raw = v.contiguous().view(torch.uint8).numpy()
        begin = start * v.element_size()
        if begin + raw.nbytes > nbytes:
            raise ValueError(f"'{name}': entries {start}…{start + v.numel()} are past its end")
        _pwrite_all(fd, raw, offset + begin)
        self._done[name] = self._done.get(name, 0) + raw.nbytes
        if self._journal is not None and self._done[name] == nbytes:
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
                elif done != self._where[name][2]:
                    raise ValueError(f"'{name}': {done} of {self._where[name][2]} bytes were written")
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
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
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


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.device.type)


class AdapterWriter:
    """Collect merged ΔW per LoRA-targeted parameter as truncated SVD factors, then write a PEFT adapter.

    Rank per module: ``rank`` when given, else the sum of the input adapters' ranks for that module,
    capped at the matrix size. That is exact for methods that combine the ΔWᵢ linearly (rank(Σ wᵢΔWᵢ) ≤ Σ rᵢ);
    trimming methods (TIES, DARE, ...) make ΔW full rank, so the truncation error of every module is
    kept in ``errors`` (and reported), with a warning above 1 %.
    """

    def __init__(self, rank: int | None = None, svd: str = "auto") -> None:
        self.rank = rank
        self.svd = svd  # ops.low_rank method: auto (randomized when the rank is far below the size) | full
        self.model = None
        self.experts: list = []
        self.modules: dict = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: dict[str, float] = {}  # relative Frobenius error of the truncation, per module
        self.skipped: list[str] = []
        self.fan_in_fan_out: bool | None = None

    def bind(self, model: torch.nn.Module, experts: list) -> "AdapterWriter":
        """Attach the model being merged and its experts (all LoRA adapters) before the merge runs."""
        for e in experts:
            if e.kind != "lora":
                raise ConfigError(f"--save adapter needs LoRA experts; '{getattr(e, 'name', e)}' is not a LoRA adapter")
        self.model, self.experts, self.modules = model, experts, dict(model.named_modules())
        return self

    def __call__(self, name: str, delta: torch.Tensor) -> None:
        module_name, _, leaf = name.rpartition(".")
        module = self.modules.get(module_name)
        input_ranks = []  # rank of each adapter that has LoRA factors for this parameter (factors read once)
        if leaf == "weight" and delta.dim() == 2:
            input_ranks = [f[1].shape[0] for f in (e.factors(name) for e in self.experts) if f is not None]
        if not input_ranks:
            if torch.count_nonzero(delta):
                self.skipped.append(name)
            return
        conv1d = is_conv1d(module)
        if self.fan_in_fan_out is None:
            self.fan_in_fan_out = conv1d
        elif self.fan_in_fan_out != conv1d:
            raise ConfigError("--save adapter: the targets mix Linear and Conv1D layers, which one PEFT adapter cannot hold")
        mat = delta.t() if conv1d else delta  # PEFT factors are (out, r) @ (r, in)
        r = min(self.rank or sum(input_ranks), *mat.shape)
        b, a, self.errors[module_name] = ops.low_rank(mat, r, method=self.svd)  # randomized when r << size
        self.factors[module_name] = (b.cpu(), a.cpu())

    def save(self, output_dir: str | Path, base_model_name: str, info: dict[str, Any] | None = None) -> Path:
        if not self.factors:
            raise ConfigError("--save adapter: no LoRA-targeted parameter was merged")
        if self.skipped:
            logger.warning("--save adapter: %d merged tensors are not LoRA targets and are not in the adapter: %s",
                           len(self.skipped), ", ".join(self.skipped[:5]))
        worst = max(self.errors, key=self.errors.get)
        if self.errors[worst] > 0.01:
            logger.warning("--save adapter: the rank-limited adapter differs from the merged model by up to %.1f%% "
                           "(relative Frobenius error, %s); raise --set adapter_rank or use --save full "
                           "(trimming methods such as TIES or DARE make ΔW full rank)", 100 * self.errors[worst], worst)
        ranks = {m: a.shape[0] for m, (b, a) in self.factors.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {m: k for m, k in ranks.items() if k != r}
        task = "SEQ_2_SEQ_LM" if getattr(self.model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
        config = {
            "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(self.factors), "fan_in_fan_out": bool(self.fan_in_fan_out),
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        }
        tensors = {}
        for m, (b, a) in self.factors.items():
            tensors[f"base_model.model.{m}.lora_A.weight"] = a
            tensors[f"base_model.model.{m}.lora_B.weight"] = b
        output_dir = Path(output_dir)
        with atomic_path(output_dir) as tmp:
            tmp.mkdir(parents=True)
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / "adapter_config.json", config)
            (tmp / "README.md").write_text(model_card(info or {}), encoding="utf-8")
        return output_dir
