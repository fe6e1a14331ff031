"""Calibration data and activation statistics for data-aware merge methods (RegMean, Fisher, AdaMerging...).

* Prompts: :func:`load_calibration` reads ``--calibration-data`` files: kit JSON lines / JSON arrays and kit
  CSV (the ``input`` field, and ``answer_choices`` where a record has them: labels and targets are never read) or plain-text files
  (``.txt``: one prompt per non-empty line). An entry ``I=PATH`` gives expert ``I`` (0-based, ``--models``
  order) prompts of its own; plain entries are shared by every expert without own files.
  ``--calibration-examples N`` keeps at most N prompts per expert, taken round-robin over its files.
* Tokens: :func:`encode` tokenises and truncates to the model's context (the prompt's end is kept, as in
  evaluation), :func:`batches` pads (right) and batches by a token budget, longest first.
* Expert forward passes without a second model: :func:`expert_weights` writes θ₀ + τᵢ into the loaded
  model's parameters for the duration of a ``with`` block and puts the original tensors back afterwards.
* Statistics: :class:`InputGrams` accumulates XᵀX (float32) of the inputs of chosen modules with forward
  hooks over non-padding tokens, and stops the forward pass once every chosen module has run
  (:func:`run_forward`), so later layers cost nothing.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from llm_merging.core.errors import ConfigError, DataError
from llm_merging.core.resources import peak_memory
from llm_merging.data import read_csv_rows, read_json_rows
from llm_merging.model import is_conv1d
from llm_merging.model.scoring import (
    choice_lists,
    length_limit,
    pad_id_of,
    truncate_left,
)

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLES = 256
DEFAULT_TOKENS_PER_BATCH = 8192  # tokens (padding included) per forward pass


# ----------------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike, choices: dict[str, list[str]] | None = None) -> list[str]:
    """The prompts of one calibration file: the ``input`` of each record of a kit JSON lines / JSON array /
    CSV file, or each non-empty line of a ``.txt`` file. Empty prompts are dropped. DataError (one line,
    naming the file and record) for a missing file, malformed JSON/CSV or a record without ``input``.
    ``choices``: filled with ``prompt -> answer choices`` for records that have ``answer_choices`` (kit
    lists or CSV list strings; AdaMerging's choice distribution). Labels and targets are never read."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"--calibration-data: file '{p}' does not exist")
    if p.is_dir():
        raise DataError(f"--calibration-data: '{p}' is a directory, expected a data file")
    if p.suffix.lower() == ".txt":
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--calibration-data: cannot read '{p}': {exc}") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    rows = read_csv_rows(p) if p.suffix.lower() == ".csv" else read_json_rows(p)
    out = []
    try:
        for where, rec in rows:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with an 'input' field, got {type(rec).__name__} "
                                "(plain-text prompts go in a .txt file, one per line)")
            if "input" not in rec:
                raise DataError(f"{where}: no 'input' field (calibration reads the prompts only; "
                                "plain-text prompts go in a .txt file)")
            text = rec["input"]
            if text is None:
                continue
            if not isinstance(text, (str, int, float)) or isinstance(text, bool):
                raise DataError(f"{where}: 'input' must be a string, got {type(text).__name__}")
            text = str(text)
            if text.strip():
                out.append(text)
                if choices is not None and rec.get("answer_choices") not in (None, "", []):
                    choices.setdefault(text, _choice_list(rec["answer_choices"], where))
    except DataError as exc:
        msg = str(exc)
        raise DataError(msg if msg.startswith("--calibration-data") else f"--calibration-data: {msg}") from None
    return out


def _choice_list(value: Any, where: str) -> list[str]:
    try:
        out = choice_lists({"answer_choices": [value]})[0]
    except (ValueError, SyntaxError, TypeError):
        raise DataError(f"{where}: 'answer_choices' is not a list of choices") from None
    return [c for c in out if c]


def _round_robin(lists: Sequence[list[str]], n: int) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(x) for x in lists):
        for x in lists:
            if i < len(x) and len(out) < n:
                out.append(x[i])
        i += 1
    return out


@dataclass
class Calibration:
    """Calibration prompts: ``shared`` (every expert without files of its own) and ``own[i]`` (expert i)."""

    shared: list[str]
    own: dict[int, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    max_examples: int = DEFAULT_EXAMPLES
    choices: dict[str, list[str]] = field(default_factory=dict)  # prompt -> answer choices (records that have them)

    def prompts_for(self, i: int) -> list[str]:
        """The prompts of expert ``i`` (its own when it has files, else the shared ones)."""
        return self.own.get(i) or self.shared

    def all_prompts(self) -> list[str]:
        """Every distinct prompt (shared first, then each expert's own), in order."""
        seen: dict[str, None] = {}
        for p in [*self.shared, *(q for i in sorted(self.own) for q in self.own[i])]:
            seen.setdefault(p, None)
        return list(seen)

    def counts(self, n_experts: int) -> list[int]:
        return [len(self.prompts_for(i)) for i in range(n_experts)]

    def paths(self) -> list[str]:
        """The files read (without ``I=`` prefixes)."""
        return [f.partition("=")[2] if _own_index(f) is not None else f for f in self.files]


def _own_index(spec: str) -> int | None:
    head, sep, rest = spec.partition("=")
    return int(head) if sep and head.isdigit() and rest else None


def load_calibration(specs: Sequence[str] | None, n_experts: int, max_examples: int | None = DEFAULT_EXAMPLES,
                     *, method: str = "?") -> Calibration:
    """Read ``--calibration-data`` entries (``PATH`` shared, ``I=PATH`` expert I's own); keep at most
    ``max_examples`` prompts per expert. ConfigError/DataError (one line) when there are no files, an index
    is out of range, a file is unusable, or an expert is left with no prompt."""
    if not specs:
        raise ConfigError(f"method '{method}' is data-aware: give unlabeled prompts with --calibration-data FILES "
                          "(kit JSON lines / CSV 'input' fields, or .txt lines)")
    n = DEFAULT_EXAMPLES if max_examples is None else max_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--calibration-examples must be a positive integer, got {max_examples!r}")
    shared: list[list[str]] = []
    own: dict[int, list[list[str]]] = {}
    choices: dict[str, list[str]] = {}
    for spec in specs:
        i = _own_index(spec)
        if i is not None:
            if i >= n_experts:
                raise ConfigError(f"--calibration-data {spec}: expert index {i} out of range ({n_experts} expert(s), 0-based)")
            own.setdefault(i, []).append(read_prompts(spec.partition("=")[2], choices))
        else:
            shared.append(read_prompts(spec, choices))
    cal = Calibration(_round_robin(shared, n), {i: _round_robin(v, n) for i, v in own.items()}, list(specs), n)
    kept = set(cal.all_prompts())
    cal.choices = {k: v for k, v in choices.items() if k in kept and len(v) > 1}
    for i in range(n_experts):
        if not cal.prompts_for(i):
            files = [s for s in specs if _own_index(s) == i] or [s for s in specs if _own_index(s) is None]
            if not files:
                raise ConfigError(f"--calibration-data: expert {i} has no prompts (give shared files, or {i}=FILE)")
            raise DataError(f"--calibration-data {' '.join(files)}: no usable prompt (every 'input' is empty)")
    return cal


def overlapping_files(calibration: Calibration, others: Iterable[str]) -> list[str]:
    """Calibration files that are also in ``others`` (evaluation or search data): their scores are optimistic."""
    theirs = {os.path.realpath(p) for p in others if not str(p).startswith("hf:")}
    return [p for p in calibration.paths() if os.path.realpath(p) in theirs]


# ----------------------------------------------------------------------------------------------- tokens
def context_length(model, tokenizer, max_seq_len: int | None = None) -> int:
    """The longest sequence to feed: the model's and tokenizer's limit, and ``max_seq_len`` when set."""
    limit = length_limit(model, tokenizer)
    if max_seq_len:
        limit = min(limit, int(max_seq_len))
    return max(1, min(limit, 1 << 20))


def encode(tokenizer, prompts: Sequence[str], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, truncated to ``max_len`` (the end is kept, with a leading BOS, as
    evaluation does); returns ``(ids, number truncated)``. An empty encoding becomes the BOS/EOS token."""
    ids = [list(x) for x in tokenizer(list(prompts))["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    filler = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    truncated = 0
    for i, seq in enumerate(ids):
        if not seq:
            ids[i] = [filler if filler is not None else pad_id_of(tokenizer)]
        elif len(seq) > max_len:
            truncated += 1
            ids[i] = truncate_left(seq, max_len, keep_first=bos is not None and seq[:1] == [bos])
    if truncated:
        logger.info("calibration: %d of %d prompts truncated to %d tokens", truncated, len(ids), max_len)
    return ids, truncated


def batches(ids: Sequence[list[int]], pad_id: int, device=None,
            tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask"}`` (longest first), each at most
    ``tokens_per_batch`` tokens with padding (one sequence at least)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    start = 0
    while start < len(order):
        width = len(ids[order[start]])
        size = max(1, min(len(order) - start, tokens_per_batch // max(width, 1)))
        chunk = [ids[i] for i in order[start:start + size]]
        start += size
        t = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        m = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, seq in enumerate(chunk):
            t[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            m[r, :len(seq)] = 1
        yield {"input_ids": t.to(device), "attention_mask": m.to(device)}


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments of one calibration forward pass of ``model``: the batch, no KV cache; for an
    encoder-decoder, the prompt shifted right is also the decoder input (teacher forcing on the prompt)."""
    kwargs: dict[str, Any] = {**batch, "use_cache": False}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        ids = batch["input_ids"]
        if hasattr(model, "prepare_decoder_input_ids_from_labels"):
            dec = model.prepare_decoder_input_ids_from_labels(labels=ids)
        else:
            dec = model._shift_right(ids)
        kwargs["decoder_input_ids"] = dec
        kwargs["decoder_attention_mask"] = batch["attention_mask"]
    return kwargs


def decoder_start(model) -> int:
    """The token an encoder-decoder's decoder starts from (``decoder_start_token_id``, else the pad id)."""
    cfg = model.config
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(cfg, "pad_token_id", None)
    if start is None:
        raise ConfigError("the encoder-decoder model's config has no decoder_start_token_id")
    return int(start)


# ----------------------------------------------------------------------------------------------- experts
@contextmanager
def expert_weights(model: torch.nn.Module, expert, names: Iterable[str] | None,
                   theta0: Callable[[str, torch.nn.Parameter], torch.Tensor],
                   merged: Iterable[str] = ()) -> Iterator[list[str]]:
    """Within the block, each parameter in ``names`` (None: every parameter ``expert`` changes) holds the
    expert's weights θ₀ + τ in the parameter's dtype: θ₀ + τ where the expert changes it, θ₀ where it does
    not but the parameter is in ``merged`` (already overwritten by a merge, so no longer θ₀); yields the
    names swapped. ``theta0(name, param)`` gives θ₀ in float32 (e.g. a copy of the current value, or a read
    from the base files once the parameter is merged) as a tensor of its own: τ is added to it in place.
    The original tensors are put back on exit (exactly: the very same storage). Extra memory: the swapped
    tensors, in the model's dtype."""
    params = dict(model.named_parameters())
    touched = set(expert.param_names())
    wanted = touched if names is None else set(names)
    merged = set(merged)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in [n for n in params if n in wanted and (n in touched or n in merged)]:
                p = params[name]
                base = theta0(name, p)
                delta = expert.delta(name, base) if name in touched else None
                if delta is None and name not in merged:
                    continue
                value = base.to(dtype=torch.float32)
                if delta is not None:
                    value = value.add_(delta.to(device=base.device, dtype=torch.float32))
                saved[name] = p.data
                p.data = value.to(device=p.device, dtype=p.dtype)
                del base, delta, value
        yield list(saved)
    finally:
        for name, data in saved.items():
            params[name].data = data


class StopForward(Exception):
    """Raised by a hook once every module of interest has run (the rest of the forward pass is skipped)."""


def is_linear(module: torch.nn.Module) -> bool:
    """A dense layer y = x Wᵀ (+ b): ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2; W stored as (in, out))."""
    return isinstance(module, torch.nn.Linear) or is_conv1d(module)


def linear_weights(model: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """``{parameter name: module name}`` for the parameters in ``names`` that are the weight of exactly one
    dense layer (tied weights, e.g. an embedding shared with the head, are left out)."""
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or name not in params or owners.get(id(params[name]), 0) != 1:
            continue
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            continue
        if is_linear(module) and module.weight is params[name]:
            out[name] = mod_name
    return out


class InputGrams:
    """Forward hooks accumulating Gᵐ = Σ xxᵀ (XᵀX, float32, on the activations' device) of the inputs of
    each module ``m`` of ``modules`` over the non-padding tokens of the batches run inside the ``with`` block.

    Consecutive modules fed the very same tensor object (q/k/v projections, gate/up) share one Gram matrix
    (``grams[m]`` is the same tensor; ``alias[m]`` names the first). With ``stop=True`` the forward pass raises :class:`StopForward` once every module ran.
    """

    def __init__(self, model: torch.nn.Module, modules: Sequence[str], *, stop: bool = True) -> None:
        self.model = model
        self.names = list(modules)
        self.stop = stop
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.alias: dict[str, str] = {}
        self._masks: list[torch.Tensor] = []
        self._fired: set[str] = set()
        self._last: tuple[torch.Tensor, str] | None = None  # the last input seen (modules sharing it share a Gram)
        self._handles: list = []
        self._first_batch = True

    def __enter__(self) -> "InputGrams":
        for name in self.names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def nbytes(self) -> int:
        return sum(g.numel() * 4 for n, g in self.grams.items() if n not in self.alias)

    def set_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Call before each forward pass: the padding mask of the batch."""
        mask = batch["attention_mask"].bool()
        self._masks = [mask]
        self._fired.clear()
        self._last = None
        self.tokens += int(mask.sum())

    def end_batch(self) -> None:
        missing = [n for n in self.names if n not in self._fired]
        if missing:
            raise RuntimeError(f"calibration: module '{missing[0]}' was not run by the forward pass")
        self._first_batch = False
        self._last = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        for mask in self._masks:
            if tuple(x.shape[:-1]) == tuple(mask.shape):
                return flat[mask.reshape(-1)]
        return flat

    def _hook(self, name: str):
        def hook(module, args, output):
            if name in self._fired:  # a module run twice in one pass (weight sharing): counted once
                return
            self._fired.add(name)
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                last = self._last
                same = last is not None and last[0] is x  # the very tensor the previous hooked module took
                if self._first_batch and same:
                    self.alias[name] = self.alias.get(last[1], last[1])
                    self.grams[name] = self.grams[self.alias[name]]
                elif name in self.alias:
                    if not same:
                        raise RuntimeError(f"calibration: module '{name}' no longer shares the input of '{self.alias[name]}'")
                else:
                    rows = self._rows(x.detach()).to(torch.float32)
                    g = self.grams.get(name)
                    if g is None:
                        self.grams[name] = rows.T @ rows
                    else:
                        g.addmm_(rows.T, rows)
                    del rows
                self._last = (x, name)
            if self.stop and len(self._fired) == len(self.names):
                self._last = None
                raise StopForward
        return hook


def run_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], collector: InputGrams | None = None) -> Any:
    """One calibration forward pass (no gradient, no KV cache); a :class:`StopForward` from the
    collector's hooks ends it early (returns None then)."""
    if collector is not None:
        collector.set_batch(batch)
    try:
        with torch.no_grad():
            out = model(**forward_inputs(model, batch))
    except StopForward:
        out = None
    if collector is not None:
        collector.end_batch()
    return out


class Meter:
    """Seconds and peak memory spent on calibration, for report.json (``as_dict``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.forward_passes = 0
        self.tokens = 0
        self.statistics_bytes = 0

    @contextmanager
    def timing(self) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds += time.time() - t0

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "forward_passes": self.forward_passes, "tokens": self.tokens,
                "peak_statistics_mib": round(self.statistics_bytes / 2**20, 1), **peak_memory()}
