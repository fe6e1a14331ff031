"""The merge engine: walk the base model's parameters, get each expert's task vector for that parameter,
call the method's per-tensor function and write the result into the base, in place.

Memory: the base model plus O(one tensor × number of experts). Math in float32 on the GPU when there is
one; results are cast to the model's dtype.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from llm_merging.core.errors import BudgetExceeded, CheckpointError, LLMMergingError, MergeError, first_line
from llm_merging.model import auto_model_class, vocab_modules
from llm_merging.model.checkpoint import FullExpert, Part, is_vocab_param, read_safetensors_header, saved_layout
from llm_merging.model.lora import LoraAdapter
from llm_merging.model.refs import hf_token

logger = logging.getLogger(__name__)

TensorFn = Callable[[str, torch.Tensor, list], torch.Tensor]


class Expert(Protocol):
    """What the engine needs of an expert: a LoRA adapter (``kind`` "lora", ``LoraAdapter``), a full
    fine-tune ("full", ``FullExpert``) or the base listed among the models ("base", ``BaseAsExpert``).
    ``kind`` is the one answer to "is this expert an adapter"; ``factors`` gives LoRA's (B, A) (None for
    the others)."""

    name: str
    kind: str

    def bind(self, base_param_shapes: dict[str, tuple]) -> None: ...

    def param_names(self) -> set[str]: ...

    def delta(self, param_name: str, base: torch.Tensor) -> torch.Tensor | None: ...

    def factors(self, param_name: str, device=None) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def close(self) -> None: ...


def base_param_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def config_param_shapes(model_dir, architecture: str) -> dict[str, tuple]:
    """Parameter shapes of the model in ``model_dir`` from its config alone (meta device, no weights)."""
    import warnings

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto_model_class(architecture).from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the model config in {model_dir}: {first_line(exc)}") from None
    return base_param_shapes(model)


def check_base_files(model_dir) -> None:
    """Check the headers of the base model's safetensors files (truncated downloads) without reading data."""
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        read_safetensors_header(file)


class BaseAsExpert:
    """The base model listed among the models (mergekit's linear and slerp take it as an input): τ = 0."""

    kind = "base"

    def __init__(self, name: str) -> None:
        self.name = name

    def bind(self, base_param_shapes: dict[str, tuple]) -> None:
        pass

    def param_names(self) -> set[str]:
        return set()  # touches nothing by itself; where another expert touches a tensor its τ is 0

    def delta(self, param_name: str, base: torch.Tensor) -> None:
        return None

    def factors(self, param_name: str, device=None) -> None:
        return None

    def close(self) -> None:
        pass


def open_experts(models: Sequence[tuple[Any, bool]], shapes: dict[str, tuple], *, base_path=None,
                 vocab_reindexed: bool = False) -> list:
    """Open each ``(model reference, is_adapter)`` lazily (LoRA adapter, full checkpoint, or the base itself
    when it resolves to ``base_path``) and bind it to ``shapes``. ``vocab_reindexed``: a recipe's tokenizer
    re-indexes the vocabulary tensors (``merge_vocabulary``), so full experts skip their own row handling."""
    experts = []
    base = None if base_path is None else Path(base_path).resolve()
    for ref, is_adapter in models:
        path = ref.resolve(hf_token())
        if base is not None and path.resolve() == base:
            expert = BaseAsExpert(str(ref))
        elif is_adapter:
            expert = LoraAdapter.load(path, name=str(ref))
        else:
            expert = FullExpert(path, name=str(ref))
            expert.vocab_reindexed = vocab_reindexed
        expert.bind(shapes)
        experts.append(expert)
    return experts


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> None:
    """glibc malloc for the merge loop: buffers under ``mmap_threshold`` (the chunk buffers, a few MiB
    each) are reused from the heap, whose top is given back to the OS only past ``trim_threshold`` of
    free space; larger ones (whole-tensor temporaries) are mmapped and returned to the OS when freed.
    Glibc's own adaptive threshold instead keeps mapping, faulting in and unmapping chunk-sized buffers:
    3x the system time of a whole large-vocabulary merge (benchmarks/merge_memory.py). Process-wide and
    kept after the merge (evaluation then runs with it too: up to ``trim_threshold`` of freed heap may stay
    resident). No-op without glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, int(trim_threshold))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def open_base_reader(base_dir, model: torch.nn.Module):
    """The base checkpoint as a tensor reader bound to ``model`` (None when its files cannot serve)."""
    try:
        reader = FullExpert(base_dir, name="base")
        reader.bind(base_param_shapes(model))
    except LLMMergingError:
        return None
    return None if reader.vocab_mismatch else reader


#: entries per chunk of the chunked merges (multiples of ops.streaming.BLOCK): CPU buffers stay small
#: enough to be reused from the allocator's heap; GPU chunks are larger (fewer launches)
CHUNK_CPU = 1 << 20
CHUNK_DEVICE = 1 << 24
#: a parameter whose task vectors take at most this many bytes (float32, all experts, θ₀ included) has
#: them computed once and kept while a merge of several passes (TIES, DARE with L1) runs, instead of
#: reading them again on every pass
CACHE_BYTES = 64 << 20


class RangeReader:
    """θ₀ and every expert's τ = θᵢ − θ₀ of one parameter for flat ranges of entries (float32 on the math
    device): the ``read`` of :mod:`llm_merging.ops.streaming`. Base values come from the base checkpoint
    when it has them (as the whole-tensor path), else from the loaded parameter."""

    def __init__(self, name: str, param: torch.Tensor, sources: list, base_source, device: torch.device) -> None:
        self.name, self.param, self.sources, self.base_source, self.device = name, param, sources, base_source, device
        self.numel = param.numel()
        self.chunk = CHUNK_CPU if device.type == "cpu" else CHUNK_DEVICE  # entries per range
        self._cache = None
        self._last = None  # (start, stop, θ₀) of the last uncached read
        self._cacheable = 4 * self.numel * (len(sources) + 1) <= CACHE_BYTES

    @classmethod
    def open(cls, name: str, param: torch.Tensor, experts: Sequence[Expert], base_reader,
             device: torch.device) -> "RangeReader | None":
        """None when an expert cannot serve ranges of ``name`` (e.g. a LoRA adapter that touches it, a
        vocabulary mismatch, ``.bin`` checkpoints): the engine then merges the whole tensor."""
        sources = []
        for expert in experts:
            if expert.kind == "base":
                sources.append(None)  # τ = 0
            elif callable(getattr(expert, "range_readable", None)) and expert.range_readable(name):
                sources.append(expert)
            elif name not in expert.param_names():
                sources.append(None)
            else:
                return None
        base = None
        if base_reader is not None and name in base_reader.mapping:  # θ₀ from the files, as the whole-tensor path
            if not base_reader.range_readable(name):
                return None
            base = base_reader
        return cls(name, param, sources, base, device)

    def single_pass(self) -> None:
        """The merge reads every range once (elementwise methods): keep nothing between reads."""
        self._cacheable = False

    def base(self, start: int, stop: int) -> torch.Tensor:
        """θ₀ of the entries ``start … stop − 1`` (float32, a new tensor)."""
        if self._cache is not None:
            return self._cache[0][start:stop].clone()
        if self.base_source is not None:
            raw = self.base_source.read_range(self.name, start, stop)
            return raw.to(device=self.device).to(dtype=torch.float32)  # fp16 → fp32 on the math device
        return self.param.detach().reshape(-1)[start:stop].to(device=self.device, dtype=torch.float32, copy=True)

    def _read(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = self.base(start, stop)
        # θᵢ − θ₀ with θᵢ as stored: the subtraction promotes to float32 (exact, as casting first)
        tvs = [torch.zeros_like(base) if src is None
               else torch.sub(src.read_range(self.name, start, stop).to(device=self.device), base)
               for src in self.sources]
        self._last = (start, stop, base)
        return base, tvs

    def take_base(self, start: int, stop: int) -> torch.Tensor:
        """θ₀ of ``start … stop − 1`` for the merged values, as a tensor the caller may overwrite: the one the
        last read of that very range gave the method (which is done with it once it yielded the range's
        merged values), else a new read."""
        last, self._last = self._last, None
        if last is not None and last[0] == start and last[1] == stop:
            return last[2]
        return self.base(start, stop)

    def _read_all(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The whole parameter, as ``_read``, in one block (one allocation: above :func:`tune_allocator`'s
        mmap threshold it is mapped on its own and returned to the OS when freed)."""
        block = torch.empty((len(self.sources) + 1, self.numel), dtype=torch.float32, device=self.device)
        block[0].copy_(self.base(0, self.numel))
        for row, src in zip(block[1:], self.sources):
            if src is None:
                row.zero_()
            else:
                torch.sub(src.read_range(self.name, 0, self.numel).to(device=self.device), block[0], out=row)
        return block[0], list(block[1:])

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """θ₀ and the task vectors of the entries ``start … stop − 1`` (not to be modified)."""
        if self._cacheable and self._cache is None:
            self._cache = self._read_all()
        if self._cache is not None:
            base, tvs = self._cache
            return base[start:stop], [t[start:stop] for t in tvs]
        return self._read(start, stop)


# --------------------------------------------------------------------------------------------------------
# fused mixture-of-experts parameters: merged part by part
# --------------------------------------------------------------------------------------------------------
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _expert_count(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def merge_parts(model: torch.nn.Module) -> dict[str, list[Part]]:
    """The parameters of ``model`` that the engine merges part by part, each part as its own tensor: the
    fused expert tensors of a mixture-of-experts layer (transformers 5 holds e.g. Mixtral's experts as
    ``mlp.experts.gate_up_proj`` of shape (E, 2I, H)) split into the matrices a checkpoint stores, under
    their on-disk names (``block_sparse_moe.experts.3.w1.weight``, ``mlp.experts.3.up_proj.weight``: see
    `checkpoint.saved_layout`). Fused expert tensors that transformers also saves fused (gpt-oss) are split
    per expert along their first dimension, named ``….experts.E.NAME``. Every method then sees what it
    would see on the unfused checkpoint: one matrix per expert and projection (per-tensor statistics,
    SVDs, seeds and recipe filters included)."""
    layout = saved_layout(model) or {}
    out = {n: ps for n, ps in layout.items() if len(ps) > 1 and all(p.start >= 0 for p in ps)}
    count = _expert_count(model)
    if count:
        for name, p in model.named_parameters():
            module, _, leaf = name.rpartition(".")
            if name in layout or not module.endswith("experts") or p.dim() < 2 or p.shape[0] != count:
                continue
            step = p[0].numel()
            out[name] = [Part(f"{module}.{e}.{leaf}", e * step, tuple(p.shape[1:])) for e in range(count)]
    return out


def tensor_aliases(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Other names of the tensors the engine hands a method (recipe filters match any of them): a part of a
    fused parameter (`merge_parts`) is also its parameter's in-memory name; a parameter saved under another
    name (Mixtral's router ``mlp.gate.weight``, saved ``block_sparse_moe.gate.weight``) also that name."""
    out: dict[str, tuple[str, ...]] = {}
    for name, parts in (saved_layout(model) or {}).items():
        if len(parts) == 1 and parts[0].name != name:
            out[name] = (parts[0].name,)
    for name, parts in merge_parts(model).items():
        for p in parts:
            out[p.name] = (name,)
    return out


def merge_in_parts(merge_tensor: TensorFn, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor],
                   parts: list[Part] | None) -> torch.Tensor:
    """The merged task vector of parameter ``name`` from whole tensors, ``merge_tensor`` called once per part
    (`merge_parts`) with the part's name and shape, as the engine merges fused expert tensors; ``parts`` None:
    one call on the whole tensor. For callers that hold θ₀ and the task vectors whole (e.g. a search's
    candidates)."""
    if not parts:
        return merge_tensor(name, base, task_vectors)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_tvs = [t.reshape(-1) for t in task_vectors]
    for part in parts:
        a, b = part.start, part.start + part.numel
        merged = merge_tensor(part.name, flat_base[a:b].clone().view(part.shape),
                              [t[a:b].clone().view(part.shape) for t in flat_tvs])
        if merged.shape != part.shape:
            raise MergeError(f"merge of '{part.name}' (part of parameter '{name}') returned shape "
                             f"{tuple(merged.shape)}, expected {tuple(part.shape)}")
        flat_out[a:b].copy_(merged.reshape(-1))
    return out


class PartReader:
    """A :class:`RangeReader` seen on one part of its parameter (entries ``start … start + numel − 1``), as
    if that part were the whole tensor."""

    def __init__(self, reader: RangeReader, start: int, numel: int) -> None:
        self.reader, self.start, self.numel = reader, start, numel
        self.chunk = reader.chunk

    def single_pass(self) -> None:
        self.reader.single_pass()

    def base(self, start: int, stop: int) -> torch.Tensor:
        return self.reader.base(self.start + start, self.start + stop)

    def take_base(self, start: int, stop: int) -> torch.Tensor:
        return self.reader.take_base(self.start + start, self.start + stop)

    def __call__(self, start: int, stop: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.reader(self.start + start, self.start + stop)


ChunksFn = Callable[[str, RangeReader, int, int], Any]


def _merge_chunked(name: str, param: torch.Tensor, chunks, reader, writer=None, out=None, offset: int = 0,
                   numel: int | None = None) -> torch.Tensor | None:
    """θ₀ + merged, chunk by chunk, into a new tensor of the parameter's dtype on its device; or, with a
    ``writer`` (:class:`~llm_merging.model.save.StreamingSave`), each chunk written out as it comes (None).
    ``offset`` / ``numel``: the chunks are those of one part of the parameter (``reader`` a
    :class:`PartReader` of it), written at entries ``offset …`` of ``out`` (or of the saved tensor)."""
    numel = param.numel() if numel is None else numel
    if out is None and writer is None:
        out = torch.empty(param.numel(), dtype=param.dtype, device=param.device)
    done = 0
    for start, stop, merged in chunks:
        if start != done or merged.numel() != stop - start:
            raise MergeError(f"chunked merge of parameter '{name}' returned entries {start}:{stop} "
                             f"({merged.numel()} values) after {done}")
        result = reader.take_base(start, stop).add_(merged.reshape(-1))
        if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
            raise MergeError(f"merge produced NaN or Inf in parameter '{name}'")
        if writer is not None:
            writer.put(name, offset + start, result.to(param.dtype))  # rounded as param.data would hold it
        else:
            out[offset + start:offset + stop].copy_(result)
        done = stop
    if done != numel:
        raise MergeError(f"chunked merge of parameter '{name}' stopped at entry {done} of {numel}")
    return None if out is None else out.view(param.shape)


def _merge_parts_chunked(name: str, param: torch.Tensor, parts: list[Part], reader: RangeReader,
                         merge_chunks: ChunksFn, n_models: int, writer=None):
    """A fused parameter merged part by part in chunks (each part as its own tensor, under its own name);
    None where the method has no chunked form."""
    out = None if writer is not None else torch.empty(param.numel(), dtype=param.dtype, device=param.device)
    for i, part in enumerate(parts):
        sub = PartReader(reader, part.start, part.numel)
        chunks = merge_chunks(part.name, sub, part.numel, n_models)
        if chunks is None:
            if i:
                raise MergeError(f"merge of parameter '{name}': part '{part.name}' has no chunked form but the "
                                 "parts before it had")
            return None
        _merge_chunked(name, param, chunks, sub, writer, out, part.start, part.numel)
    return out.view(param.shape) if out is not None else param


def _merge_parts_whole(name: str, param: torch.Tensor, parts: list[Part], experts: Sequence[Expert], base_reader,
                       device: torch.device, merge_tensor: TensorFn, delta_sink, writer):
    """A fused parameter merged part by part, each part whole (``merge_tensor(part name, θ₀, τs)`` with the
    part's own shape). Full fine-tunes and the base checkpoint are read one part at a time; other experts
    (LoRA adapters) give their task vector of the whole parameter once. Returns the merged parameter
    (None with a ``writer``)."""
    numel = param.numel()
    out = None if writer is not None else torch.empty(numel, dtype=param.dtype, device=param.device)
    merged_all = torch.empty(numel, dtype=torch.float32, device=device) if delta_sink is not None else None
    whole: dict[int, torch.Tensor] = {}
    base_whole = None

    def full_base() -> torch.Tensor:
        nonlocal base_whole
        if base_whole is None:
            base_whole = _base_value(base_reader, name, param, device)
        return base_whole

    from_files = base_reader is not None and name in base_reader.mapping
    touches = [expert.kind != "base" and name in expert.param_names() for expert in experts]
    for part in parts:
        a, b = part.start, part.start + part.numel
        if from_files:
            base = base_reader.part(name, a, b, device=device)
        else:
            base = param.detach().reshape(-1)[a:b].to(device=device, dtype=torch.float32, copy=True)
        base = base.view(part.shape)
        task_vectors = []
        for i, expert in enumerate(experts):
            if not touches[i]:
                task_vectors.append(torch.zeros_like(base))
            elif callable(getattr(expert, "part", None)):
                task_vectors.append(expert.part(name, a, b, device=device).view(part.shape).sub_(base))
            else:
                if i not in whole:
                    tv = expert.delta(name, full_base())
                    whole[i] = (torch.zeros_like(full_base()) if tv is None
                                else tv.to(device=device, dtype=torch.float32)).reshape(-1)
                task_vectors.append(whole[i][a:b].view(part.shape))
        merged = merge_tensor(part.name, base, task_vectors)
        if merged.shape != base.shape:
            raise MergeError(f"merge of '{part.name}' (part of parameter '{name}') returned shape "
                             f"{tuple(merged.shape)}, expected {tuple(base.shape)}")
        if merged_all is not None:
            merged_all[a:b].copy_(merged.reshape(-1))
        result = base.add_(merged).reshape(-1)
        if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
            raise MergeError(f"merge produced NaN or Inf in parameter '{name}'")
        if writer is not None:
            writer.put(name, a, result.to(dtype=param.dtype))
        else:
            out[a:b].copy_(result)
        del base, task_vectors, merged, result
    if delta_sink is not None:
        delta_sink(name, merged_all.view(param.shape))
    return None if out is None else out.view(param.shape)


def _store(param: torch.Tensor, value: torch.Tensor) -> None:
    """``value`` becomes the parameter (in its dtype): fresh storage on the CPU (the loaded weights may be
    memory-mapped files), in place elsewhere."""
    if param.device.type == "cpu":
        param.data = value.to(device=param.device, dtype=param.dtype)
    else:
        param.data.copy_(value.to(dtype=param.dtype))


def compute_device(param: torch.Tensor) -> torch.device:
    """Where to do the math for ``param``: its own device, or the GPU when the model sits on the CPU."""
    if param.device.type != "cpu":
        return param.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@torch.no_grad()
def merge_into(
    model: torch.nn.Module,
    experts: Sequence[Expert],
    merge_tensor: TensorFn,
    *,
    progress: bool = True,
    label: str = "?",
    delta_sink: Callable[[str, torch.Tensor], None] | None = None,
    base_dir=None,
    should_stop: Callable[[], bool] | None = None,
    tokenizer_plan=None,
    merge_chunks: ChunksFn | None = None,
    writer=None,
    split_experts: bool = True,
) -> dict[str, Any]:
    """Merge ``experts`` into ``model`` in place with ``merge_tensor(name, base, task_vectors)``.

    ``merge_tensor`` returns the merged task vector; the parameter becomes ``base + merged``. Parameters
    no expert touches are left as they are. ``delta_sink(name, merged)`` (e.g. the adapter writer) sees
    every merged task vector. Raises MergeError naming the parameter if the result is not finite.

    ``base_dir`` (the base model's directory): base values are read from its files (exact θ₀ whatever
    dtype the model was loaded in); on the CPU merged parameters get fresh storage, so the memory-mapped
    weights of the loaded model are never touched (no page is counted twice in RSS).
    ``should_stop()`` is asked between tensors (the wall-clock budget): True raises BudgetExceeded.
    ``tokenizer_plan`` (a `tokenizer_union.TokenizerPlan`, recipes' ``tokenizer_source``): unless it is the
    identity, the input embedding and output head are merged on its vocabulary by `merge_vocabulary`
    (and the model resized); every other tensor goes through the loop below as usual.

    ``merge_chunks(name, read, numel, n_models)`` (optional): the method's chunked form, an iterator of
    ``(start, stop, merged)`` over flat ranges (:mod:`llm_merging.ops.streaming`), or None where it has
    none. Where every expert can read ranges of a parameter (full safetensors fine-tunes, the base, experts
    that do not touch it) and no ``delta_sink`` needs whole task vectors, the parameter is merged in chunks
    of ``CHUNK_CPU`` / ``CHUNK_DEVICE`` entries: memory O(chunk × experts) beyond the result, the same
    values bit for bit.

    ``writer`` (a :class:`~llm_merging.model.save.StreamingSave` of ``model``): every merged parameter is
    written there as it is computed (chunk by chunk where chunked) instead of into ``model``, which keeps
    θ₀: the merged model is never held in memory (``--no-eval --save full``). Tensors ``writer.done(name)``
    (written by an interrupted merge that ``--resume`` continues) are skipped.

    ``split_experts``: the fused expert tensors of a mixture-of-experts model (`merge_parts`) are merged
    part by part, ``merge_tensor`` / ``merge_chunks`` called once per expert matrix with its on-disk name
    and shape (whole or chunked as any tensor), so that every method computes what it computes on the
    per-expert checkpoint; False: whole (methods whose statistics are kept per parameter).
    """
    if not experts:
        raise MergeError(f"method '{label}' has no expert models to merge")
    touched: set[str] = set()
    for expert in experts:  # experts are bound to this model: their names are its parameter names
        touched |= set(expert.param_names())
    reindex = tokenizer_plan is not None and not tokenizer_plan.is_identity
    if reindex and delta_sink is not None:
        raise MergeError("a tokenizer that changes the vocabulary cannot be written as an adapter; use --save full")
    if reindex and writer is not None:
        raise MergeError("a tokenizer that changes the vocabulary resizes the model: it cannot be written while merging")
    vocab_names = {n for n, _ in vocab_params(model, tokenizer_plan.source_rows[0])} if reindex else set()
    params = [(n, p) for n, p in model.named_parameters() if n in touched and n not in vocab_names]
    base_reader = open_base_reader(base_dir, model) if base_dir is not None else None
    parts_of = merge_parts(model) if split_experts else {}  # fused experts: merged per expert matrix
    tune_allocator()
    t0 = time.time()
    n_values = 0
    n_chunked = 0
    n_parted = 0
    device = None
    n_resumed = 0
    for name, param in tqdm(params, desc="merge", unit="tensor", disable=not progress, leave=False):
        device = compute_device(param)
        if writer is not None and writer.done(name):  # written by the interrupted merge this one resumes
            n_resumed += 1
            continue
        if should_stop is not None and should_stop():
            raise BudgetExceeded(f"time budget ran out while merging (at parameter '{name}'); nothing was saved")
        parts = parts_of.get(name)
        if merge_chunks is not None and delta_sink is None:
            reader = RangeReader.open(name, param, experts, base_reader, device)
            if reader is not None and parts:
                chunk_out = _merge_parts_chunked(name, param, parts, reader, merge_chunks, len(experts), writer)
                chunks = None if chunk_out is None else True
            else:
                chunks = None if reader is None else merge_chunks(name, reader, param.numel(), len(experts))
                chunk_out = None if chunks is None else _merge_chunked(name, param, chunks, reader, writer)
            if chunks is not None:
                if writer is None:
                    _store(param, chunk_out)
                n_values += param.numel()
                n_chunked += 1
                n_parted += bool(parts)
                del chunk_out, chunks, reader
                continue
        if parts:
            part_out = _merge_parts_whole(name, param, parts, experts, base_reader, device, merge_tensor,
                                          delta_sink, writer)
            if writer is None:
                _store(param, part_out)
            n_values += param.numel()
            n_parted += 1
            del part_out
            continue
        if base_reader is not None and name in base_reader.mapping:
            # θ₀ as stored: the loaded copy may be rounded to a narrower dtype (e.g. bf16 from fp16 files),
            # and that rounding error would otherwise enter every task vector.
            base = base_reader.tensor(name, param).to(device=device)
        else:
            base = param.detach().to(device=device, dtype=torch.float32, copy=True)
        task_vectors = []
        for expert in experts:
            tv = expert.delta(name, base)
            task_vectors.append(torch.zeros_like(base) if tv is None else tv.to(device=device, dtype=torch.float32))
        merged = merge_tensor(name, base, task_vectors)
        if merged.shape != base.shape:
            raise MergeError(f"merge of parameter '{name}' returned shape {tuple(merged.shape)}, expected {tuple(base.shape)}")
        result = base.add_(merged)
        if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():  # cheap check first
            raise MergeError(f"merge produced NaN or Inf in parameter '{name}'")
        if delta_sink is not None:
            delta_sink(name, merged)
        if writer is not None:
            writer.put(name, 0, result.to(dtype=param.dtype))
        else:
            _store(param, result)
        n_values += param.numel()
        del base, task_vectors, merged, result
    vocab_stats = None
    if reindex:
        if should_stop is not None and should_stop():
            raise BudgetExceeded("time budget ran out while merging (at the vocabulary tensors); nothing was saved")
        vocab_stats = merge_vocabulary(model, experts, merge_tensor, tokenizer_plan, base_reader=base_reader,
                                       progress=progress)
        n_values += vocab_stats.pop("values")
        device = device or torch.device(vocab_stats["math_device"])
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()  # give fp32 temporaries back: evaluation sizes its batches from free memory
    return {
        "tensors_merged": len(params) + (len(vocab_stats["tensors"]) if vocab_stats else 0),
        "tensors_chunked": n_chunked,
        **({"tensors_merged_per_expert": n_parted} if n_parted else {}),
        **({"tensors_resumed": n_resumed} if n_resumed else {}),
        "values_merged": n_values,
        "seconds": round(time.time() - t0, 3),
        "math_device": str(device) if device is not None else None,
        "experts": [getattr(e, "name", str(e)) for e in experts],
        "unused_expert_tensors": sorted({t for e in experts for t in getattr(e, "unused_tensors", [])}),
        **({"vocabulary": vocab_stats} if vocab_stats else {}),
    }


# --------------------------------------------------------------------------------------------------------
# the vocabulary tensors under an output tokenizer (recipes' tokenizer_source / tokenizer:)
# --------------------------------------------------------------------------------------------------------
def vocab_params(model: torch.nn.Module, rows: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of ``model``'s input embedding and output head whose first dimension is the
    vocabulary (``rows`` long); a tied head is the embedding's parameter and is listed once."""
    owned = {id(p) for module in vocab_modules(model) for p in module.parameters(recurse=False)}
    out = []
    for name, p in model.named_parameters():
        mine = id(p) in owned if owned else is_vocab_param(name)
        if mine and p.dim() >= 1 and p.shape[0] == rows:
            out.append((name, p))
    return out


def _base_value(base_reader, name: str, param: torch.Tensor, device: torch.device) -> torch.Tensor:
    if base_reader is not None and name in base_reader.mapping:
        return base_reader.tensor(name, param).to(device=device)
    return param.detach().to(device=device, dtype=torch.float32, copy=True)


def _expert_rows(expert, name: str, base: torch.Tensor) -> torch.Tensor | None:
    """Expert's full matrix for ``name`` in its own vocabulary (float32 on ``base.device``); None when it
    lacks the weight. Full fine-tunes: the checkpoint's rows as stored (no pad-or-truncate to the base's
    vocabulary); adapters and the base listed as a model: base + ΔW, in the base's vocabulary."""
    raw = getattr(expert, "raw_tensor", None)
    if raw is not None:
        t = raw(name, device=base.device)
        return None if t is None else t.to(dtype=torch.float32)
    tv = expert.delta(name, base)
    if tv is None:
        return base  # never written to: align_rows makes new tensors
    return tv.to(device=base.device, dtype=torch.float32).add_(base)


@torch.no_grad()
def merge_vocabulary(model: torch.nn.Module, experts: Sequence[Expert], merge_tensor: TensorFn, plan, *,
                     base_reader=None, progress: bool = False) -> dict[str, Any]:
    """Merge the input embedding and output head on the vocabulary of ``plan`` (mergekit 0.1.5's
    ``tokenizer_source``), then resize ``model`` to ``plan.vocab_size`` and write the merged rows.

    For each such parameter: the base's and every expert's full matrix, each in its own vocabulary, are
    re-indexed by ``plan.align`` (base first; a model lacking the weight is left out and its τ is 0); the
    task vectors are taken from the aligned base and merged with ``merge_tensor``, as mergekit does.
    Memory: one vocabulary matrix per model (base included) plus one, per parameter; the results are kept
    in the model's dtype until the resize. Tied weights are one parameter: aligned once, written to both.
    """
    base_rows = plan.source_rows[0]
    params = vocab_params(model, base_rows)
    if not params:
        raise MergeError(f"the output tokenizer needs the input embedding re-indexed, but the base model has no "
                         f"embedding or head with {base_rows} rows (its config.vocab_size)")
    results: dict[str, torch.Tensor] = {}
    device = None
    n_values = 0
    for name, param in tqdm(params, desc="merge vocabulary", unit="tensor", disable=not progress, leave=False):
        device = compute_device(param)
        rows = [_base_value(base_reader, name, param, device)]
        rows += [_expert_rows(e, name, rows[0]) for e in experts]
        aligned = plan.align(rows, consume=True)  # each input is dropped once its aligned copy is made
        del rows
        base_al = aligned[0]
        task_vectors = [torch.zeros_like(base_al) if a is None else a.sub_(base_al) for a in aligned[1:]]
        del aligned
        merged = merge_tensor(name, base_al, task_vectors)
        if merged.shape != base_al.shape:
            raise MergeError(f"merge of parameter '{name}' returned shape {tuple(merged.shape)}, "
                             f"expected {tuple(base_al.shape)}")
        result = base_al.add_(merged)
        if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
            raise MergeError(f"merge produced NaN or Inf in parameter '{name}'")
        results[name] = result.to(dtype=param.dtype)
        n_values += result.numel()
        del task_vectors, merged, result, base_al

    # resize (tied heads follow the embedding), then overwrite every row with the merge result
    try:
        model.resize_token_embeddings(plan.vocab_size, mean_resizing=False)
    except TypeError:  # older transformers
        model.resize_token_embeddings(plan.vocab_size)
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.vocab_size = plan.vocab_size
        if text is not config and hasattr(config, "vocab_size"):
            config.vocab_size = plan.vocab_size
    now = dict(model.named_parameters())
    for name, value in results.items():
        p = now.get(name)
        if p is None or tuple(p.shape) != tuple(value.shape):
            got = "missing" if p is None else f"shape {tuple(p.shape)}"
            raise MergeError(f"after resizing to {plan.vocab_size} rows, parameter '{name}' is {got}, "
                             f"expected {tuple(value.shape)}")
        p.data = value.to(device=p.device, dtype=p.dtype)
    del results
    logger.info("vocabulary tensors %s merged on the output vocabulary (%d rows, was %d)",
                ", ".join(n for n, _ in params), plan.vocab_size, base_rows)
    return {"tensors": [n for n, _ in params], "rows": plan.vocab_size, "base_rows": base_rows,
            "values": n_values, "math_device": str(device)}
