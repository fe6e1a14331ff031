"""Evaluation data: starter-kit JSON lines, starter-kit CSV and (optionally) Hugging Face datasets.

Every loader returns the same row format, a list of dicts:

* ``input`` (str): the prompt;
* ``eval_type``: ``"multiple_choice"`` or ``"generation"``;
* ``answer_choices`` (list of str): multiple-choice rows only;
* ``label`` (int): multiple-choice rows whose gold choice is known;
* ``target`` (str): when the file has one (generation reference, or the gold choice);
* ``id`` (str) and any other column of a CSV file, unchanged.

The eval type of a row comes from the ``eval_type`` argument (one per file), else from the row's
``eval_type`` field, else it is inferred: rows with answer choices are multiple choice, others generation.

Every problem in a file is a :class:`~llm_merging.core.errors.DataError` with a one-line message naming the
file and the line (JSON lines) or data row (CSV, 1-based, header excluded).
"""
from __future__ import annotations

import ast
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from llm_merging.core.errors import ConfigError, DataError

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
EVAL_TYPES = (MULTIPLE_CHOICE, GENERATION)

# Cells that mean "no answer choices" in kit CSV files (pandas writes None/NaN for missing values).
_EMPTY_CELLS = {"", "none", "nan", "null", "[]"}

__all__ = [
    "Dataset",
    "EVAL_TYPES",
    "GENERATION",
    "MULTIPLE_CHOICE",
    "check_eval_type",
    "examples_from_records",
    "load_examples",
    "load_hf_examples",
]


def _one_line(text: Any, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_eval_type(value: Any, where: str = "eval_type") -> str:
    """Return ``value`` as a known eval type, or raise :class:`ConfigError`."""
    if value not in EVAL_TYPES:
        raise ConfigError(f"{where}: unknown eval type {value!r} (expected one of {', '.join(EVAL_TYPES)})")
    return value


def eval_types_for(eval_types: Any, n: int) -> list[str | None]:
    """One eval type (or None: from each row) per data file: ``None``, one string for every file, or a list
    with one entry per file (``"auto"``/``""`` mean None). The one rule for the CLI and the library."""
    if eval_types is None:
        return [None] * n
    if isinstance(eval_types, str):
        eval_types = [eval_types] * n
    eval_types = list(eval_types)
    if len(eval_types) != n:
        raise ConfigError(f"--eval_types has {len(eval_types)} values but --dataset_filepaths has {n} files")
    return [None if t is None or t in ("", "auto") else check_eval_type(t, "--eval_types") for t in eval_types]


def check_max_examples(value: Any, where: str = "max_examples", minimum: int = 0) -> int | None:
    """``value`` as the number of rows to keep per file (None: all); one rule for the CLI (``minimum=1``) and
    the library (0 keeps no row)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an integer of at least {minimum}, got {value!r}")
    return value


def _parse_choices(value: Any, where: str) -> list[str] | None:
    """Answer choices from a list or a Python/JSON list string; ``None`` when there are none."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _EMPTY_CELLS:
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(f"{where}: cannot parse answer_choices {_one_line(text, 80)!r} (expected a list like ['A', 'B'])") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise DataError(f"{where}: answer_choices must be a list, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, (list, dict, tuple, set)) or item is None:
            raise DataError(f"{where}: answer_choices must be a list of strings, got an item {_one_line(repr(item), 60)}")
        out.append(item if isinstance(item, str) else str(item))
    return out or None


def _parse_label(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise DataError(f"{where}: label must be an integer, got {value!r}")
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if not value.is_integer():
            raise DataError(f"{where}: label must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise DataError(f"{where}: label must be an integer, got {_one_line(repr(value), 60)}") from None


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return None


def _normalize_row(raw: dict, where: str, eval_type: str | None, *, csv_style: bool) -> dict:
    """Turn one raw record into the common row format (see module docstring)."""
    if "input" not in raw or raw["input"] is None:
        raise DataError(f"{where}: missing 'input'")
    row = dict(raw)
    text = row["input"]
    if not isinstance(text, str):
        if isinstance(text, (int, float)) and not (isinstance(text, float) and math.isnan(text)):
            text = str(text)
        else:
            raise DataError(f"{where}: 'input' must be a string, got {type(text).__name__}")
    row["input"] = text

    choices = _parse_choices(row.get("answer_choices"), where)
    if choices is None:
        row.pop("answer_choices", None)
    else:
        row["answer_choices"] = choices

    # Eval type: argument > row field > inferred.
    row_type = row.get("eval_type")
    if isinstance(row_type, str):
        row_type = row_type.strip() or None
    elif isinstance(row_type, float) and math.isnan(row_type):
        row_type = None
    if eval_type is not None:
        etype = eval_type
    elif row_type is not None:
        if row_type not in EVAL_TYPES:
            raise DataError(f"{where}: unknown eval_type {_one_line(repr(row_type), 60)} (expected one of {', '.join(EVAL_TYPES)})")
        etype = row_type
    else:
        etype = MULTIPLE_CHOICE if choices else GENERATION
    row["eval_type"] = etype

    target = row.get("target")
    if target is None or (isinstance(target, float) and math.isnan(target)) or (isinstance(target, str) and target == "" and csv_style):
        row.pop("target", None)
        target = None
    elif not isinstance(target, str):
        target = str(int(target)) if isinstance(target, float) and target.is_integer() else str(target)
        row["target"] = target

    label = _parse_label(row.get("label"), where)
    if etype == MULTIPLE_CHOICE:
        if not choices:
            raise DataError(f"{where}: eval type multiple_choice but no answer_choices")
        if label is None and target is not None:
            as_int = _int_or_none(target)
            if csv_style and as_int is not None:
                label = as_int  # kit CSV convention: the target of a multiple-choice row is the choice index
            elif target in choices:
                label = choices.index(target)
            elif as_int is not None:
                label = as_int
        if label is not None and not 0 <= label < len(choices):
            raise DataError(f"{where}: label {label} out of range for {len(choices)} answer choices")
    if label is None:
        row.pop("label", None)
    else:
        row["label"] = label
    return row


def read_json_rows(path: Path) -> Iterable[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):  # a plain JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        for i, rec in enumerate(records):
            yield f"{path}: record {i + 1}", rec
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
        yield f"{path}: line {lineno}", rec


def read_csv_rows(path: Path) -> Iterable[tuple[str, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{path}: file is empty")
        header = [h.strip() for h in header]
        if "input" not in header:
            raise DataError(f"{path}: CSV has no 'input' column (columns: {', '.join(header)})")
        n = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
            if not cells or all(not c.strip() for c in cells):
                continue
            n += 1
            if len(cells) > len(header):
                raise DataError(f"{path}: row {n}: {len(cells)} fields for {len(header)} columns")
            cells = cells + [""] * (len(header) - len(cells))
            yield f"{path}: row {n}", dict(zip(header, cells))


def load_examples(
    path: str | os.PathLike,
    eval_type: str | None = None,
    max_examples: int | None = None,
) -> list[dict]:
    """Load a kit data file (``.csv``: kit CSV; anything else: JSON lines or a JSON array).

    ``path`` may also be ``hf:NAME[:CONFIG][@SPLIT]`` for a Hugging Face dataset available locally.
    ``eval_type`` forces the eval type of every row; ``max_examples`` keeps the first rows only.
    """
    if eval_type is not None:
        check_eval_type(eval_type)
    check_max_examples(max_examples)
    spec = os.fspath(path)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition("@")
        name, _, config = name.partition(":")
        return load_hf_examples(name, split=split or "validation", config=config or None,
                                eval_type=eval_type, max_examples=max_examples)
    p = Path(spec)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected a data file")
    csv_style = p.suffix.lower() == ".csv"
    reader = read_csv_rows(p) if csv_style else read_json_rows(p)
    rows: list[dict] = []
    seen_ids: dict[str, str] = {}
    for where, rec in reader:
        if max_examples is not None and len(rows) >= max_examples:
            break
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        row = _normalize_row(rec, where, eval_type, csv_style=csv_style)
        if "id" in row:
            key = str(row["id"])
            if key in seen_ids:
                raise DataError(f"{where}: duplicate id {_one_line(key, 40)!r} (first at {seen_ids[key].rsplit(': ', 1)[-1]})")
            seen_ids[key] = where
        rows.append(row)
    if not rows and max_examples != 0:
        raise DataError(f"{p}: file is empty (no examples)")
    return rows


def examples_from_records(
    records: Iterable[dict],
    source: str = "records",
    eval_type: str | None = None,
    max_examples: int | None = None,
    field_map: dict[str, str] | None = None,
) -> list[dict]:
    """Normalise in-memory records (e.g. a ``datasets.Dataset``) into the common row format.

    ``field_map`` renames source fields to kit fields, e.g. ``{"question": "input", "answer": "target"}``.
    """
    if eval_type is not None:
        check_eval_type(eval_type)
    rows = []
    for i, rec in enumerate(records):
        if max_examples is not None and len(rows) >= max_examples:
            break
        rec = dict(rec)
        for src, dst in (field_map or {}).items():
            if src in rec:
                rec[dst] = rec.pop(src)
        rows.append(_normalize_row(rec, f"{source}: record {i + 1}", eval_type, csv_style=False))
    if not rows and max_examples != 0:
        raise DataError(f"{source}: no examples")
    return rows


def load_hf_examples(
    name: str,
    *,
    split: str = "validation",
    config: str | None = None,
    eval_type: str | None = None,
    max_examples: int | None = None,
    field_map: dict[str, str] | None = None,
) -> list[dict]:
    """Rows from a Hugging Face dataset already in the local cache (nothing is downloaded offline).

    The dataset's records must carry kit fields (``input``, ``target``, ``answer_choices``, ``label``),
    possibly after renaming with ``field_map``.
    """
    source = f"hf:{name}" + (f":{config}" if config else "") + f"@{split}"
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{source}: the 'datasets' package is not installed") from None
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # offline, not cached, unknown split, ...
        raise DataError(f"{source}: dataset not available locally ({_one_line(e, 120)})") from None
    return examples_from_records(ds, source, eval_type=eval_type, max_examples=max_examples, field_map=field_map)


class Dataset:
    """Kit-compatible dataset: ``len(ds)`` and ``ds[i]`` give the rows of :func:`load_examples`."""

    def __init__(self, dataset_filepath: str | os.PathLike, eval_type: str | None = None,
                 max_examples: int | None = None) -> None:
        self.dataset_filepath = os.fspath(dataset_filepath)
        self.dataset = load_examples(dataset_filepath, eval_type=eval_type, max_examples=max_examples)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return self.dataset[idx]

    def __iter__(self):
        return iter(self.dataset)
