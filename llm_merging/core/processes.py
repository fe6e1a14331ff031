"""Runs over several processes (``accelerate launch`` / ``torchrun``): who does what, and how they agree.

One process per GPU (or per CPU share with gloo). Every process preflights and merges on its own device
(merges are deterministic; :func:`same_weights` checks it and broadcasts rank 0's weights when they
differ), evaluates its share of every file's batches, and rank 0 writes every output. The processes
agree at each phase boundary and at each evaluation step: a failure or a spent budget on one process
stops all of them, with one exit status and one message.

Single-process runs never touch ``torch.distributed``: :data:`SINGLE` does each operation locally.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from llm_merging.core.errors import BudgetExceeded, ConfigError, LLMMergingError, first_line

logger = logging.getLogger(__name__)

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
GO, STOP, FAILED = 0, 1, 2  # evaluation step verdicts, agreed by max over processes


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return default


def launched() -> tuple[int, int]:
    """``(number of processes, this process's rank)`` from the launcher's environment; ``(1, 0)`` without one."""
    world = _env_int(_WORLD_VARS, 1)
    return world, (_env_int(_RANK_VARS, 0) if world > 1 else 0)


class PeerFailed(Exception):
    """Raised on a process that did nothing wrong when another one failed; never chosen as the run's error."""


class PeerError(LLMMergingError):
    """Another process's failure, raised on this one with that process's message and exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _describe(error: BaseException) -> tuple[str, int, str]:
    """``(kind, exit status, one-line message)`` of a failure, as the runner reports it."""
    if isinstance(error, PeerFailed):
        return "peer", 1, ""
    if isinstance(error, KeyboardInterrupt):
        return "interrupt", 130, "interrupted (Ctrl-C); finished work was kept"
    if isinstance(error, BudgetExceeded):
        return "budget", error.exit_code, first_line(error)
    if isinstance(error, LLMMergingError):
        return "user", error.exit_code, first_line(error)
    return "internal", 1, f"{type(error).__name__}: {first_line(error)}"


@dataclass
class Processes:
    """The processes of one run and this one's place among them."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"  # this process's device under several processes
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def exchange(self, value: Any = None, error: BaseException | None = None) -> list[Any]:
        """Everyone's ``value`` in rank order, unless some process passes an ``error``: then every process
        raises the same failure, the lowest rank's (its own exception there, a mirror elsewhere)."""
        if self.world == 1:
            if error is not None:
                raise error
            return [value]
        from accelerate.utils import gather_object

        parts = gather_object([(None if error is None else _describe(error), value)])
        failures = [(r, f) for r, (f, _) in enumerate(parts) if f is not None]
        if not failures:
            return [v for _, v in parts]
        chosen = [(r, f) for r, f in failures if f[0] != "peer"] or failures
        rank, (kind, code, message) = chosen[0]
        if rank == self.rank and error is not None:
            error._agreed = True
            raise error
        if error is not None and not isinstance(error, PeerFailed):
            logger.warning("process %d also failed: %s", self.rank, _describe(error)[2])
        alike = [f for _, f in chosen if f == (kind, code, message)]
        where = "" if len(alike) == self.world else f" (on process {rank} of {self.world})"  # not all alike
        if kind == "interrupt":
            mirror: BaseException = KeyboardInterrupt()
        elif kind == "budget":
            mirror = BudgetExceeded(message + where)
        elif kind == "internal":
            mirror = PeerError(f"internal error{where}: {message}", 1)
        else:
            mirror = PeerError(message + where, code)
        mirror._agreed = True
        raise mirror from None

    def agree(self, error: BaseException | None = None) -> None:
        """A phase boundary: raise everywhere when any process failed (see :meth:`exchange`)."""
        self.exchange(None, error)

    def together(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on every process, then agree; an error already agreed on is raised as it is."""
        if self.world == 1:
            return fn()
        try:
            value = fn()
        except (Exception, KeyboardInterrupt) as exc:
            if getattr(exc, "_agreed", False):
                raise
            self.agree(exc)
            raise  # pragma: no cover - agree raises
        self.agree()
        return value

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (writing outputs), then agree; its value on rank 0, None elsewhere."""
        if self.world == 1:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except (Exception, KeyboardInterrupt) as exc:
                error = exc
        self.agree(error)
        return value

    def max(self, value: int) -> int:
        """The largest ``value`` over the processes (one small all-reduce)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ devices
    def device_for(self, requested: str | None) -> str:
        """This process's device for a ``--device`` value: each process has its own GPU."""
        if self.world == 1:
            return requested or "auto"
        if requested in (None, "auto", "cuda") or (requested == "cpu" and self.device == "cpu"):
            return self.device
        if requested == "cpu":
            return "cpu"
        raise ConfigError(f"--device {requested}: with {self.world} processes each one uses its own GPU "
                          f"({self.device} here); pass --device auto, cuda or cpu")

    def to_dict(self) -> dict[str, Any]:
        return {"num_processes": self.world, "backend": self.backend}


SINGLE = Processes()
_current: Processes = SINGLE


def current() -> Processes:
    """The processes of the run in progress (:data:`SINGLE` unless :func:`start` joined a group)."""
    return _current


def start(timeout_s: float = 1800.0) -> Processes:
    """Join the launcher's process group through accelerate (gloo on CPU, NCCL on GPUs); :data:`SINGLE`
    when the process was not launched as one of several. ``timeout_s``: how long a process may wait for
    the others at a collective (rank 0 saving the model, a slower merge)."""
    global _current
    world, _ = launched()
    if world == 1:
        return SINGLE
    if _current.world > 1:
        return _current
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a requirement
        raise ConfigError("several processes need accelerate: pip install accelerate") from None
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    try:
        state = PartialState(cpu=cpu, timeout=timedelta(seconds=max(timeout_s, 60.0)))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot join the {world} launched processes: {first_line(exc)}") from None
    if state.num_processes != world:
        raise ConfigError(f"the launcher started {world} processes, but accelerate sees {state.num_processes}")
    _current = Processes(world=state.num_processes, rank=state.process_index, local_rank=state.local_process_index,
                         device=str(state.device) if state.device.type != "cpu" else "cpu", backend=state.backend)
    return _current


# ---------------------------------------------------------------------------------------- merged weights

def _tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers (tied ones once), in a fixed order."""
    return [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]


def fingerprint(model: torch.nn.Module, chunk: int = 1 << 22) -> list[int]:
    """Per parameter and buffer, an integer checksum of its bits, computed on the tensor's device: the sum
    over chunks of its 16-bit words of ``(chunk number + 1) * Σ word * (position in chunk + 1)``. Equal
    weights give equal fingerprints; a changed bit changes its tensor's."""
    out, weights = [], {}
    for t in _tensors(model):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        words = flat.view(torch.int16) if flat.numel() % 2 == 0 else flat
        if words.device not in weights:
            weights[words.device] = torch.arange(1, chunk + 1, device=words.device, dtype=torch.int64)
        w = weights[words.device]
        total = 0
        for k, s in enumerate(range(0, words.numel(), chunk)):
            part = words[s: s + chunk]
            total += (k + 1) * int((part.to(torch.int64) * w[: part.numel()]).sum().item())  # any device
        out.append(total)
    return out


def broadcast_weights(processes: Processes, model: torch.nn.Module, indices: Sequence[int] | None = None) -> None:
    """Give every process rank 0's values of the tensors at ``indices`` of :func:`_tensors` (default all);
    fresh storage elsewhere, so memory-mapped checkpoint pages are never written."""
    tensors = _tensors(model)
    for i in range(len(tensors)) if indices is None else indices:
        t = tensors[i]
        buf = t.data if processes.is_main else torch.empty_like(t.data)
        torch.distributed.broadcast(buf, src=0)
        if not processes.is_main:
            t.data = buf


def same_weights(processes: Processes, model: torch.nn.Module) -> str:
    """After every process merged: ``"identical"`` when every fingerprint equals rank 0's, else the tensors
    that differ somewhere get rank 0's values (``"broadcast"``)."""
    if processes.world == 1:
        return "single"
    fp, error = None, None
    try:
        fp = fingerprint(model)
    except (Exception, KeyboardInterrupt) as exc:
        error = exc
    prints = processes.exchange(fp, error)
    if any(len(p) != len(prints[0]) for p in prints):
        raise LLMMergingError("the processes merged models with different tensors; run in one process to see why")
    differ = [i for i in range(len(prints[0])) if any(p[i] != prints[0][i] for p in prints)]
    if not differ:
        return "identical"
    if processes.is_main:
        logger.warning("%d merged tensors differ between the processes: broadcasting process 0's", len(differ))
    error = None
    try:
        broadcast_weights(processes, model, differ)
    except RuntimeError as exc:  # pragma: no cover - a broken process group
        error = exc
    processes.agree(error)
    return "broadcast"
