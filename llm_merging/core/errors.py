"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

import signal


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


class OutputError(LLMMergingError):
    """The output folder cannot take this run: another run holds it, the disk is (or would be) full."""


class BudgetExceeded(LLMMergingError):
    """The wall-clock budget ran out; finished work is kept."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM: the run stops at the next safe point (finished work is kept) and exits
    with 128 + the signal number (130, 143)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.signal_name = signal_name(self.signum)
        super().__init__(f"interrupted ({self.signal_name})")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line user errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, ...; the number itself when it names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
