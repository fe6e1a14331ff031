"""Batched evaluation of a merge method on kit data files: predictions, scores, submission CSV.

``evaluate_model(merge_method, dataset_filepaths, output_folder)`` keeps the kit's positional
signature. For each data file it

1. loads the rows (:mod:`llm_merging.data`), groups them by eval type (and, for multiple choice, by
   number of choices, so that kit-style code which assumes one choice count per batch keeps working),
   sorts each group by length (longest first: less padding, and memory problems show up at once);
2. calls ``merge_method.predict_multiple_choice(batch)`` / ``merge_method.generate(batch)`` on kit
   batches (dict of lists), so a participant class overriding either method is what gets evaluated;
3. restores the input order and writes, under ``<output_folder>/<method name>/``:

   * ``predictions/<file stem>.jsonl``: the row's fields plus ``prediction`` (choice index or text),
     ``predicted_choice`` + ``answer_choices_scores`` (multiple choice) or ``predicted_text``;
   * ``<file stem>_submission.csv`` (files with an ``id`` column): ``id,prediction`` in input order,
     choice predictions as the kit writes them (the index as a string);
   * ``scores.jsonl``: one line appended per run, ``{<stem>: {metric: value}, ..., "average": {...}}``
     with values rounded to 3 digits. Metrics: ``accuracy`` over multiple-choice rows with a label,
     ``rouge1/rouge2/rougeL/rougeLsum`` over generation rows with a target (a file without gold answers,
     like the kit's test.csv, gets ``{}``); ``"partial": true`` marks a file cut short by the budget.
     ``average``: ``score`` = mean over scored files of their main metric (accuracy, rougeL, or the
     mean of both for a mixed file), plus the kit's ``accuracy`` average when every file is accuracy-only.

Under a :class:`~llm_merging.core.budget.Budget` it stops between batches once the budget is spent, keeps
what finished and marks the dataset partial.
"""
from __future__ import annotations

import copy
import csv
import gc
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.core.io import atomic_append_line, atomic_write_text
from llm_merging.core.processes import FAILED, GO, SINGLE, STOP, PeerFailed, current
from llm_merging.data import EVAL_TYPES, GENERATION, MULTIPLE_CHOICE, check_max_examples, eval_types_for, load_examples
from llm_merging.metrics import accuracy, rouge
from llm_merging.model.scoring import model_device

logger = logging.getLogger(__name__)

# Batch sizes used on CPU with batch_size="auto" (measured with benchmarks/eval_speed.py).
CPU_BATCH_SIZE = {MULTIPLE_CHOICE: 16, GENERATION: 8}
MAX_AUTO_BATCH_SIZE = 256
_GPU_MEMORY_FRACTION = 0.6


@dataclass
class DatasetResult:
    """Outcome of one data file."""

    name: str
    path: str
    eval_types: list[str]
    n_examples: int
    n_evaluated: int = 0
    n_scored: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    partial: bool = False
    batch_size: int | None = None
    predictions_path: str | None = None
    submission_path: str | None = None
    source: str = "kit"  # "kit" (a data file) or "lm_eval" (an lm-eval-harness task: --lm-eval)
    main_metric: str | None = None  # lm-eval: the metric the average takes (kit files: see primary_score)

    def primary(self) -> float | None:
        """The value the run's average takes: accuracy / ROUGE-L for kit files, ``main_metric`` else."""
        if self.source == "kit":
            return primary_score(self.scores)
        return self.scores.get(self.main_metric) if self.main_metric else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate_model`; ``to_dict()`` feeds ``report.json``."""

    method: str
    output_dir: str
    datasets: list[DatasetResult] = field(default_factory=list)
    average: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    scores_path: str | None = None

    @property
    def partial(self) -> bool:
        return any(d.partial for d in self.datasets)

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        return {d.name: dict(d.scores) for d in self.datasets}

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "output_dir": self.output_dir,
            "partial": self.partial,
            "seconds": self.seconds,
            "average": dict(self.average),
            "scores_path": self.scores_path,
            "datasets": [d.to_dict() for d in self.datasets],
        }


# -------------------------------------------------------------------------------------------- helpers

def _method_name(merge_method) -> str:
    getter = getattr(merge_method, "get_name", None)
    name = getter() if callable(getter) else getattr(merge_method, "name", None)
    if not name:
        raise ConfigError("merge method has no name (get_name() / .name)")
    return str(name)


def _normalize_paths(dataset_filepaths) -> list[str]:
    if dataset_filepaths is None:
        raise ConfigError("no dataset file paths given")
    if isinstance(dataset_filepaths, (str, os.PathLike)):
        return [os.fspath(dataset_filepaths)]
    return [os.fspath(p) for p in dataset_filepaths]


def normalize_batch_size(batch_size) -> int | None:
    """``None`` for "auto", else a positive int."""
    if batch_size is None or batch_size == "auto":
        return None
    if isinstance(batch_size, str) and batch_size.strip().isdigit():
        batch_size = int(batch_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be 'auto' or a positive integer, got {batch_size!r}")
    return batch_size


def unique_names(paths: Sequence[str]) -> list[str]:
    """Output names: the file stem, disambiguated when two files share it."""
    stems = [Path(p).stem if not p.startswith("hf:") else p[3:].replace("/", "_").replace(":", "_").replace("@", "_")
             for p in paths]
    out, used = [], set()
    for p, stem in zip(paths, stems):
        name = stem
        if stems.count(stem) > 1:
            name = f"{stem}_{Path(p).suffix.lstrip('.') or 'data'}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


def _length_key(row: dict) -> int:
    n = len(row["input"])
    if row["eval_type"] == MULTIPLE_CHOICE:
        n += max((len(c) for c in row.get("answer_choices", ())), default=0)
    return n


def _sort_tokenizer(merge_method):
    """The tokenizer that encodes prompts, when the method exposes one (kit attribute names)."""
    for attr in ("input_tokenizer", "tokenizer"):
        tok = getattr(merge_method, attr, None)
        if callable(tok):
            return tok
    return None


def row_lengths(rows: Sequence[dict], tokenizer=None) -> list[int]:
    """Sort keys: the prompt's token count when a tokenizer is given (exact padding), else characters."""
    if tokenizer is not None and rows:
        try:
            ids = tokenizer([r["input"] for r in rows], add_special_tokens=False)["input_ids"]
            return [len(x) for x in ids]
        except Exception:  # a tokenizer with an unusual interface: fall back to characters
            logger.debug("token lengths unavailable; sorting by characters", exc_info=True)
    return [len(r["input"]) for r in rows]


def plan_groups(rows: Sequence[dict], lengths: Sequence[int] | None = None) -> list[tuple[str, list[int]]]:
    """Row indices grouped by eval type (multiple choice: also by choice count), each group sorted
    longest first (by ``lengths``, default characters; ties: longest choice, then input order); groups
    ordered by their longest example."""
    if lengths is None:
        lengths = [len(r["input"]) for r in rows]

    def key(i: int):
        longest_choice = max((len(c) for c in rows[i].get("answer_choices", ())), default=0)
        return (-lengths[i], -longest_choice, i)

    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        k = (row["eval_type"], len(row.get("answer_choices", ())) if row["eval_type"] == MULTIPLE_CHOICE else 0)
        groups.setdefault(k, []).append(i)
    out = []
    for k, idx in groups.items():
        idx.sort(key=key)
        out.append((k[0], idx))
    out.sort(key=lambda g: key(g[1][0]))
    return out


def make_batch(rows: Sequence[dict]) -> dict[str, list]:
    """Kit batch (dict of lists) from rows; values are copies, so a method may modify them."""
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k not in keys:
                keys.append(k)
    return {k: [copy.deepcopy(row.get(k)) for row in rows] for k in keys}


def _to_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if hasattr(x, "tolist"):
        return x.tolist()
    return list(x)


def _finite_or_none(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _is_oom(err: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(err, oom_types)


def model_of(merge_method):
    for attr in ("base_model", "merged_model"):
        model = getattr(merge_method, attr, None)
        if isinstance(model, torch.nn.Module):
            return model
    return None


def _device_of(merge_method) -> torch.device:
    """Where the method's model takes its inputs (:func:`scoring.model_device`), else its ``device``."""
    model = model_of(merge_method)
    if model is not None:
        return model_device(model)
    try:
        return torch.device(str(getattr(merge_method, "device", "cpu") or "cpu"))
    except RuntimeError:
        return torch.device("cpu")


def estimate_example_bytes(config, dtype_bytes: int, eval_type: str, prompt_tokens: int,
                           n_choices: int = 0, choice_tokens: int = 0, gen_tokens: int = 0) -> int:
    """Rough peak GPU memory of one example (KV cache, activations, logits), for batch_size="auto"."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names, default=None):
        for n in names:
            v = getattr(cfg, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden = first("hidden_size", "d_model", "n_embd", default=4096)
    layers = first("num_hidden_layers", "num_layers", "n_layer", default=32)
    layers += first("num_decoder_layers", default=0) if getattr(cfg, "is_encoder_decoder", False) else 0
    heads = first("num_attention_heads", "num_heads", "n_head", default=32)
    kv_heads = first("num_key_value_heads", default=heads)
    head_dim = first("head_dim", "d_kv", default=max(hidden // heads, 1))
    inter = first("intermediate_size", "d_ff", "n_inner", default=4 * hidden)
    vocab = first("vocab_size", default=32000)
    kv_per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    act_per_token = (4 * hidden + 3 * inter) * dtype_bytes
    attn = heads * prompt_tokens * prompt_tokens * dtype_bytes
    if eval_type == MULTIPLE_CHOICE:
        cache_tokens = prompt_tokens * (1 + n_choices) + n_choices * choice_tokens
        logits = (1 + n_choices * choice_tokens) * vocab * 4 * 3
        acts = max(prompt_tokens, n_choices * choice_tokens) * act_per_token
    else:
        cache_tokens = prompt_tokens + gen_tokens
        logits = vocab * 4 * 4
        acts = prompt_tokens * act_per_token
    return int(cache_tokens * kv_per_token + acts + attn + logits)


def auto_batch_size(merge_method, eval_type: str, rows: Sequence[dict]) -> int:
    """Batch size for ``rows`` (one group): fixed on CPU, from free memory on GPU."""
    device = _device_of(merge_method)
    if device.type != "cuda" or not torch.cuda.is_available():
        return CPU_BATCH_SIZE[eval_type]
    model = model_of(merge_method)
    if model is None or getattr(model, "config", None) is None:
        return 8
    free, _total = torch.cuda.mem_get_info(device)
    try:
        dtype_bytes = next(model.parameters()).element_size()
    except StopIteration:
        dtype_bytes = 2
    longest = max(rows, key=_length_key)
    prompt_tokens = len(longest["input"]) // 3 + 8  # ~3-4 characters a token in English
    choices = longest.get("answer_choices", ()) if eval_type == MULTIPLE_CHOICE else ()
    choice_tokens = max((len(c) for c in choices), default=0) // 2 + 2
    gen_tokens = int(getattr(merge_method, "max_gen_len", None) or 64)
    per_example = estimate_example_bytes(model.config, dtype_bytes, eval_type, prompt_tokens,
                                         len(choices), choice_tokens, gen_tokens)
    size = int(free * _GPU_MEMORY_FRACTION // max(per_example, 1))
    return max(1, min(MAX_AUTO_BATCH_SIZE, size, len(rows)))


class _Pace:
    """Seconds per example for each eval type, to check whether the rest fits the budget."""

    def __init__(self, remaining: dict[str, int]) -> None:
        self.remaining = dict(remaining)
        self.seconds = {t: 0.0 for t in EVAL_TYPES}
        self.done = {t: 0 for t in EVAL_TYPES}
        self.batches = {t: 0 for t in EVAL_TYPES}
        self.warned = False

    def add(self, eval_type: str, seconds: float, n: int) -> None:
        self.seconds[eval_type] += seconds
        self.done[eval_type] += n
        self.batches[eval_type] += 1
        self.remaining[eval_type] -= n

    def projected(self) -> float:
        rates = {t: self.seconds[t] / self.done[t] for t in EVAL_TYPES if self.done[t]}
        fallback = max(rates.values()) if rates else 0.0
        return sum(self.remaining[t] * rates.get(t, fallback) for t in EVAL_TYPES)

    def check(self, eval_type: str, budget) -> None:
        # Estimate after the first two batches of each eval type (they are the longest: conservative).
        if budget is None or self.warned or self.batches[eval_type] != 2:
            return
        need, left = self.projected(), budget.remaining()
        if need > left:
            self.warned = True
            logger.warning("evaluation may not fit the time budget: about %.0f s of work left, %.0f s of "
                           "budget left; unfinished datasets will be marked partial", need, max(left, 0.0))


def _run_batch(merge_method, eval_type: str, rows: Sequence[dict]):
    batch = make_batch(rows)
    n = len(rows)
    if eval_type == MULTIPLE_CHOICE:
        predicted, scores = merge_method.predict_multiple_choice(batch)
        predicted, scores = _to_list(predicted), _to_list(scores)
        if len(predicted) != n or len(scores) != n:
            raise ConfigError(f"predict_multiple_choice returned {len(predicted)} predictions and "
                              f"{len(scores)} score rows for a batch of {n}")
        out = []
        for row, p, s in zip(rows, predicted, scores):
            k = len(row["answer_choices"])
            s = s if isinstance(s, list) else [s]
            out.append({"prediction": int(p), "predicted_choice": int(p),
                        "answer_choices_scores": [_finite_or_none(v) for v in s[:k]]})
        return out
    ids, texts = merge_method.generate(batch)
    texts = _to_list(texts)
    if len(texts) != n:
        raise ConfigError(f"generate returned {len(texts)} texts for a batch of {n}")
    return [{"prediction": str(t), "predicted_text": str(t)} for t in texts]


def score_rows(rows: Sequence[dict], preds: dict[int, dict]) -> tuple[dict[str, float], int]:
    """Metrics over the evaluated rows that have a gold answer: accuracy (multiple choice with a
    label) and ROUGE F-measures (generation with a target)."""
    mc = [(preds[i]["prediction"], rows[i]["label"]) for i in sorted(preds)
          if rows[i]["eval_type"] == MULTIPLE_CHOICE and "label" in rows[i]]
    gen = [(preds[i]["prediction"], rows[i]["target"]) for i in sorted(preds)
           if rows[i]["eval_type"] == GENERATION and rows[i].get("target") is not None]
    scores: dict[str, float] = {}
    if mc:
        scores["accuracy"] = accuracy([p for p, _ in mc], [t for _, t in mc])
    if gen:
        scores.update(rouge([p for p, _ in gen], [t for _, t in gen]))
    return scores, len(mc) + len(gen)


def primary_score(scores: dict[str, float]) -> float | None:
    if "accuracy" in scores and "rougeL" in scores:
        return (scores["accuracy"] + scores["rougeL"]) / 2
    if "accuracy" in scores:
        return scores["accuracy"]
    return scores.get("rougeL")


def _write_predictions(path: Path, rows: Sequence[dict], preds: dict[int, dict]) -> None:
    lines = []
    for i in sorted(preds):
        rec = dict(rows[i])
        rec.update(preds[i])
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _write_submission(path: Path, rows: Sequence[dict], preds: dict[int, dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "prediction"])
    for i in sorted(preds):
        writer.writerow([rows[i]["id"], str(preds[i]["prediction"])])
    atomic_write_text(path, buf.getvalue())


def _write_outputs(dres: DatasetResult, rows: Sequence[dict], preds: dict[int, dict]) -> None:
    """A file's predictions and, when it has one, its submission CSV (the paths ``dres`` names)."""
    _write_predictions(Path(dres.predictions_path), rows, preds)
    if dres.submission_path:
        _write_submission(Path(dres.submission_path), rows, preds)


# ------------------------------------------------------------------------------------------ evaluation

class Batch(NamedTuple):
    """One planned batch: its eval type, row indices, group (index in :func:`plan_groups`) and the
    group's batch size."""

    eval_type: str
    rows: list[int]
    group: int
    size: int


def plan_batches(merge_method, rows: Sequence[dict], batch_size: int | None = None,
                 processes=None) -> list[Batch]:
    """The batches of ``rows`` in evaluation order: :func:`plan_groups` cut in batches of ``batch_size`` (``None``: :func:`auto_batch_size` per group; over several processes
    the smallest any of them picks, so that every process plans the same batches)."""
    processes = processes or SINGLE
    groups, sizes, error = [], [], None
    try:
        groups = plan_groups(rows, row_lengths(rows, _sort_tokenizer(merge_method)))
        sizes = [batch_size or auto_batch_size(merge_method, t, [rows[i] for i in order]) for t, order in groups]
    except Exception as exc:
        if processes.world == 1:
            raise
        error = exc
    everyone = processes.exchange(sizes, error)
    sizes = [min(s) for s in zip(*everyone)]
    return [Batch(t, order[p: p + size], g, size) for g, ((t, order), size) in enumerate(zip(groups, sizes))
            for p in range(0, len(order), size)]


def _run_planned(merge_method, batch: Batch, rows: Sequence[dict], cap: dict[int, int],
                 preds: dict[int, dict]) -> int:
    """One planned batch into ``preds``; on out-of-memory, in pieces of half the size (``cap[group]``,
    kept for the group's later batches, as a single loop over the group would). Returns the size used."""
    pos, chunk, eval_type = 0, batch.rows, batch.eval_type
    while pos < len(chunk):
        piece = chunk[pos: pos + cap.get(batch.group, batch.size)]
        out = None
        try:
            out = _run_batch(merge_method, eval_type, [rows[i] for i in piece])
        except Exception as err:
            if not _is_oom(err) or len(piece) == 1:
                raise
        if out is None:  # out of memory: retry the same examples in smaller batches
            # (outside the except block, so the failed batch's tensors are already freed)
            cap[batch.group] = max(1, (len(piece) + 1) // 2)
            logger.warning("out of memory with batch size %d: retrying with %d", len(piece), cap[batch.group])
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for i, p in zip(piece, out):
            preds[i] = p
        pos += len(piece)
    return cap.get(batch.group, batch.size)


def evaluate_dataset(
    merge_method,
    rows: Sequence[dict],
    *,
    batch_size: int | None = None,
    budget=None,
    progress: bool = True,
    desc: str = "eval",
    pace: _Pace | None = None,
    processes=None,
    shares: list | None = None,
) -> tuple[dict[int, dict], bool, int | None]:
    """Predictions for ``rows``: ``({row index: prediction fields}, partial, last batch size)``.

    ``processes`` (:class:`~llm_merging.core.processes.Processes`, default one): batch ``k`` of
    :func:`plan_batches` runs on process ``k mod N``; the processes step together, one batch each, and
    agree before each step whether to go on (a spent budget or a failure anywhere stops every one), so a
    budget stop keeps the same whole steps everywhere. Every process returns all the predictions
    (gathered); ``shares``, when given, receives each process's ``{"rank", "examples", "batches",
    "seconds"}``.
    """
    from tqdm.auto import tqdm

    processes = processes or SINGLE
    world, rank = processes.world, processes.rank
    preds: dict[int, dict] = {}
    partial = False
    used: int | None = None
    mine = {"rank": rank, "examples": 0, "batches": 0, "seconds": 0.0}
    error: BaseException | None = None
    verdict = GO
    bar = tqdm(total=len(rows), desc=desc, unit="ex", disable=not (progress and processes.is_main), dynamic_ncols=True)
    try:
        with torch.no_grad():
            batches = plan_batches(merge_method, rows, batch_size, processes)
            cap: dict[int, int] = {}
            for step in range(0, len(batches), world):
                expired = budget is not None and budget.remaining() <= 0
                verdict = processes.max(FAILED if error is not None else STOP if expired else GO)
                if verdict == STOP:
                    partial = True
                    if processes.is_main:
                        logger.warning("time budget spent: %s stops after %d of %d examples",
                                       desc, sum(len(b.rows) for b in batches[:step]), len(rows))
                    break
                if verdict == FAILED:
                    break
                here = batches[step: step + world]
                if rank < len(here):
                    batch = here[rank]
                    t0 = time.perf_counter()
                    try:
                        used = _run_planned(merge_method, batch, rows, cap, preds)
                    except (Exception, KeyboardInterrupt) as exc:
                        if world == 1:
                            raise
                        error = exc
                        continue
                    seconds = time.perf_counter() - t0
                    mine["examples"] += len(batch.rows)
                    mine["batches"] += 1
                    mine["seconds"] = round(mine["seconds"] + seconds, 4)
                    if pace is not None:  # the whole step's examples at this process's pace
                        n = sum(len(b.rows) for b in here)
                        for b in here:
                            pace.add(b.eval_type, seconds * len(b.rows) / n, len(b.rows))
                        if processes.is_main:
                            pace.check(batch.eval_type, budget)
                bar.update(sum(len(b.rows) for b in here))
        if world > 1:
            processes.agree(error if error is not None else PeerFailed() if verdict == FAILED else None)
            parts = processes.exchange((preds, mine))
            preds = {i: p for part, _ in parts for i, p in sorted(part.items())}
            if shares is not None:
                shares.extend(share for _, share in parts)
        elif shares is not None:
            shares.append(mine)
    finally:
        bar.close()
    return preds, partial, used


def evaluate_model(
    merge_method,
    dataset_filepaths,
    output_folder: str | os.PathLike = "output",
    *,
    eval_types=None,
    batch_size: int | str = "auto",
    max_examples: int | None = None,
    budget=None,
    progress: bool = True,
    examples: Sequence[list[dict]] | None = None,
    write_scores: bool = True,
    processes=None,
    shares: dict[str, list[dict]] | None = None,
) -> EvaluationResult:
    """Evaluate ``merge_method`` on each data file; write predictions, submission CSVs and scores.

    ``eval_types``: one per file (or one for all), ``None``/"auto" to take it from each row.
    ``batch_size``: "auto" (fixed on CPU, from free memory on GPU, halved on out-of-memory) or an int.
    ``budget``: an object with ``remaining()`` seconds; once spent, evaluation stops between batches and
    what finished is kept (datasets marked partial).
    ``examples``: the files' rows already loaded with :func:`load_examples` (same ``eval_types``), so
    they are not read again.
    ``write_scores``: append the run's ``scores.jsonl`` line (False: the caller adds more datasets, e.g.
    lm-eval tasks, then calls :func:`write_scores_line`).
    ``processes``: the run's processes (default :func:`~llm_merging.core.processes.current`, one unless launched as
    several): each evaluates its share of every file's batches and process 0 writes every file; the
    outputs are those of one process (see :func:`evaluate_dataset`); ``shares``, when given, receives
    each file's per-process shares (``{name: [{"rank", "examples", "batches", "seconds"}, ...]}``).
    """
    processes = processes or current()
    t_start = time.perf_counter()
    name = _method_name(merge_method)
    paths = _normalize_paths(dataset_filepaths)
    types = eval_types_for(eval_types, len(paths))
    fixed_size = normalize_batch_size(batch_size)
    check_max_examples(max_examples)

    # Load everything first: a bad file fails the run before any time is spent on the model.
    if examples is None:
        datasets = [load_examples(p, eval_type=t, max_examples=max_examples) for p, t in zip(paths, types)]
    else:
        datasets = [list(rows)[:max_examples] for rows in examples]
    names = unique_names(paths)
    out_dir = Path(output_folder) / name
    pred_dir = out_dir / "predictions"
    result = EvaluationResult(method=name, output_dir=str(out_dir))
    remaining = {t: sum(r["eval_type"] == t for rows in datasets for r in rows) for t in EVAL_TYPES}
    pace = _Pace(remaining)

    for path, dname, rows in zip(paths, names, datasets):
        t0 = time.perf_counter()
        dres = DatasetResult(name=dname, path=path, n_examples=len(rows),
                             eval_types=sorted({r["eval_type"] for r in rows}))
        preds, dres.partial, dres.batch_size = evaluate_dataset(
            merge_method, rows, batch_size=fixed_size, budget=budget, progress=progress, desc=dname, pace=pace,
            processes=processes, shares=None if shares is None else shares.setdefault(dname, []))
        dres.n_evaluated = len(preds)
        dres.partial = dres.partial or len(preds) < len(rows)
        dres.scores, dres.n_scored = score_rows(rows, preds)
        dres.predictions_path = str(pred_dir / f"{dname}.jsonl")
        if rows and all("id" in r for r in rows):
            dres.submission_path = str(out_dir / f"{dname}_submission.csv")
        processes.on_main(lambda: _write_outputs(dres, rows, preds))
        dres.seconds = time.perf_counter() - t0
        result.datasets.append(dres)
        if dres.scores:
            logger.info("%s: %s%s", dname, ", ".join(f"{k}={v:.4f}" for k, v in dres.scores.items()),
                        " (partial)" if dres.partial else "")

    if write_scores:
        write_scores_line(result)
    result.seconds = time.perf_counter() - t_start
    return result


def write_scores_line(result: EvaluationResult) -> None:
    """Fill ``result.average`` from its datasets (kit files and lm-eval tasks alike) and append the run's
    line to ``<output_dir>/scores.jsonl`` (nothing when there are no datasets)."""
    primaries = [p for p in (d.primary() for d in result.datasets if d.scores) if p is not None]
    result.average.clear()
    if primaries:
        result.average["score"] = sum(primaries) / len(primaries)
        scored = [d.scores for d in result.datasets if d.scores]
        if all(set(s) == {"accuracy"} for s in scored):  # the kit's own average
            result.average["accuracy"] = result.average["score"]
    if result.datasets:
        line: dict[str, Any] = {}
        for d in result.datasets:
            entry: dict[str, Any] = {k: round(v, 3) for k, v in d.scores.items()}
            if d.partial:
                entry["partial"] = True
            line[d.name] = entry
        if result.average:
            line["average"] = {k: round(v, 3) for k, v in result.average.items()}
        scores_path = Path(result.output_dir) / "scores.jsonl"
        current().on_main(lambda: atomic_append_line(scores_path, json.dumps(line)))  # process 0 writes
        result.scores_path = str(scores_path)
