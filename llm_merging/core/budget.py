"""Wall-clock budget and phase timing for a run."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

try:  # the budget starts at process start, not when this module is imported
    import psutil

    _PROCESS_START = psutil.Process(os.getpid()).create_time()
except Exception:  # pragma: no cover - psutil missing or restricted
    _PROCESS_START = time.time()


class Budget:
    """A wall-clock budget in seconds, counted from ``start`` (default: process start)."""

    def __init__(self, seconds: float = 3600.0, start: float | None = None) -> None:
        self.seconds = float(seconds)
        self.start = _PROCESS_START if start is None else start
        self.phases: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.time() - self.start

    def remaining(self) -> float:
        """Seconds left (negative once exceeded)."""
        return self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; its seconds are recorded even when the phase fails."""
        t0 = time.time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.time() - t0
