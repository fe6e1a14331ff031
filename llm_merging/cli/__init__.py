"""The command line: ``llm-merging`` (``python llm_merging/main.py``) runs a merge; ``llm-merging COMMAND``
runs one of `COMMANDS` (``analyze``, ``extract-lora``, ``moe``, ``tokensurgeon``). All share the parser
base, the logging set-up and the error-to-exit-status wrapper here.

The commands (`run` and the modules of `COMMANDS`) load the library (torch, transformers) when they are first used, through the
same lazy attribute access as the package itself, so that ``--help`` and flag errors answer at once."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Callable

from llm_merging.core.errors import LLMMergingError

logger = logging.getLogger(__name__)

#: ``llm-merging NAME ...`` -> the module of `llm_merging.cli` whose ``main(argv) -> int`` runs it (loaded on
#: first use); anything else is a merge run (``cli.run``)
COMMANDS = {"analyze": "analyze", "extract-lora": "extract", "tokensurgeon": "tokensurgeon", "moe": "moe"}

#: libraries whose INFO chatter hides ours
NOISY_LOGGERS = ("httpx", "urllib3", "huggingface_hub", "filelock", "absl", "lm_eval", "lm-eval", "matplotlib", "PIL")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``--debug``, shared by every command."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")


def setup_logging(quiet: bool, debug: bool, rank: int = 0) -> None:
    """Logging for a command: INFO (WARNING with ``--quiet``, DEBUG with ``--debug``); processes other than
    0 only warn, with their rank in front; third-party chatter and progress bars toned down."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING),
                        format=("" if rank == 0 else f"[process {rank}] ") + "%(levelname)s %(name)s: %(message)s")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded: quiet it now
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    else:  # read by transformers when a command first imports it (importing it here would cost a second)
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        if quiet:  # transformers' bars follow huggingface_hub's
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


def guarded(work: Callable[[], int], *, debug: bool = False, report: bool = True) -> int:
    """Run ``work`` and turn what it raises into an exit status: a user error prints one line and returns
    its status (2, or 3 for a spent budget); Ctrl-C prints one line and returns 130; an internal error prints
    one line and returns 1 (with ``--debug`` it raises, for the traceback). ``report=False``: exit statuses
    only (other processes)."""
    try:
        return work()
    except KeyboardInterrupt:
        if report:
            print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except LLMMergingError as exc:
        if report:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        logger.debug("internal error", exc_info=True)
        if debug:
            raise
        if report:
            print(f"error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def __getattr__(name: str):
    """``cli.run`` and the command modules (`COMMANDS`) are imported on first use (they load torch)."""
    if name == "run" or name in COMMANDS.values():
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
