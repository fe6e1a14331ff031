"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations


class LLMMergingError(Exception):
    """Base class: a user-facing problem (bad input, missing model, ...).

    The message must be one line that names the file, model or option at fault.
    """

    exit_code = 2


class ConfigError(LLMMergingError):
    """Bad CLI option, hyperparameter or method definition."""


class ModelNotFoundError(LLMMergingError):
    """A model reference (local path or hub id) cannot be resolved."""


class AdapterError(LLMMergingError):
    """An adapter is unsupported, malformed or does not fit the base model."""


class CheckpointError(LLMMergingError):
    """A checkpoint file is missing, truncated, corrupted or does not fit the base model."""


class DataError(LLMMergingError):
    """An evaluation data file is missing or malformed."""


class MergeError(LLMMergingError):
    """A merge produced an invalid result (NaN/Inf) or cannot be carried out."""


class BudgetExceeded(LLMMergingError):
    """The wall-clock budget ran out; finished work is kept."""

    exit_code = 3


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line user errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
