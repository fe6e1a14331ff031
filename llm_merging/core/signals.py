"""SIGINT (Ctrl-C) and SIGTERM during a run: the first one ends the run's budget early, so the run stops at
its next safe point (between tensors, batches, trials or phases) and keeps what it finished; a second one
stops it at once (:class:`~llm_merging.core.errors.Interrupted`)."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

from llm_merging.core.budget import Budget
from llm_merging.core.errors import Interrupted, signal_name

logger = logging.getLogger(__name__)

#: the signals a run handles: Ctrl-C and a scheduler's or ``kill``'s polite stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def graceful_stop(budget: Budget) -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM call ``budget.interrupt(signum)`` (a second signal raises
    Interrupted at once); the previous handlers are restored after. Outside the main thread (where Python
    cannot install handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if budget.interrupted is not None:
            raise Interrupted(signum)
        budget.interrupt(signum)
        logger.warning("%s: stopping at the next safe point, finished work is kept (send it again to stop now)",
                       signal_name(signum))

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # pragma: no cover
                pass


def interrupted_by(budget: object) -> int | None:
    """The signal that asked the run with ``budget`` to stop, or None."""
    return getattr(budget, "interrupted", None)
