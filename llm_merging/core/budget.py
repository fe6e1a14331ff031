"""Wall-clock budget and phase timing for a run."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from llm_merging.core.errors import Interrupted
from llm_merging.core.io import process_start

#: when this process started (the budget counts from it), else when this module was imported
_PROCESS_START = process_start() or time.time()


class Budget:
    """A wall-clock budget in seconds, counted from ``start`` (default: process start).

    A signal (SIGINT, SIGTERM: :mod:`llm_merging.core.signals`) ends it early: from then on ``remaining()``
    is at most 0, so every loop that stops when the budget is spent stops at its next safe point and keeps
    what it finished, and ``expired()`` raises :class:`~llm_merging.core.errors.Interrupted`."""

    def __init__(self, seconds: float = 3600.0, start: float | None = None) -> None:
        self.seconds = float(seconds)
        self.start = _PROCESS_START if start is None else start
        self.phases: dict[str, float] = {}
        self.interrupted: int | None = None  # the signal that asked the run to stop

    def elapsed(self) -> float:
        return time.time() - self.start

    def left(self) -> float:
        """Seconds of the budget left by the clock alone (negative once exceeded)."""
        return self.seconds - self.elapsed()

    def remaining(self) -> float:
        """Seconds left (negative once exceeded; at most 0 once a signal asked the run to stop)."""
        left = self.left()
        return min(left, 0.0) if self.interrupted is not None else left

    def expired(self) -> bool:
        """Whether the budget is spent; raises Interrupted once a signal asked the run to stop."""
        if self.interrupted is not None:
            raise Interrupted(self.interrupted)
        return self.remaining() <= 0

    def interrupt(self, signum: int) -> None:
        """Ask the run to stop at its next safe point (a signal handler calls this)."""
        self.interrupted = int(signum)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; its seconds are recorded even when the phase fails."""
        t0 = time.time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.time() - t0
