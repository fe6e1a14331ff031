"""Atomic file writing (every output is written to a temporary name and renamed into place) and JSON.

Every temporary name carries its creator's marker (:func:`process_marker`: process id, process start time and
host), so that a later run can tell the temporaries of a process that is gone from those of a live one
(:mod:`llm_merging.core.outputs` removes the former): ``.NAME.llmm-PID-START-HOST.RAND.tmp`` next to the
output ``NAME`` (:func:`temp_path`), ``.NAME.llmm-PID-START-HOST.old`` while a directory is replaced, and
``llm-merging-KIND.llmm-PID-START-HOST.RAND.tmp`` for scratch directories in ``$TMPDIR``
(:func:`scratch_dir`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from llm_merging.core.errors import ConfigError, first_line

#: a temporary next to an output: ``.NAME.MARKER[.RAND].KIND`` (KIND tmp, old or journal)
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.llmm-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[A-Za-z0-9-]+)"
                       r"(?:\.(?P<rand>[0-9a-f]{8}))?\.(?P<kind>tmp|old|journal)$")
#: a scratch directory in $TMPDIR: ``llm-merging-KIND.MARKER.RAND.tmp``
SCRATCH_NAME = re.compile(r"^llm-merging-(?P<name>[a-z0-9-]+)\.llmm-(?P<pid>\d+)-(?P<start>\d+)-"
                          r"(?P<host>[A-Za-z0-9-]+)\.(?P<rand>[0-9a-f]{8})\.(?P<kind>tmp)$")

_MARKER: dict[int, str] = {}


def process_start(pid: int | None = None) -> float | None:
    """When process ``pid`` (default: this one) started, in seconds since the epoch; None when unknown
    (no such process, or psutil cannot tell)."""
    try:
        import psutil

        return psutil.Process(os.getpid() if pid is None else pid).create_time()
    except Exception:  # psutil missing, no such process, access denied
        return None


def host_name() -> str:
    """This machine's name as it appears in temporary names (letters, digits and dashes)."""
    return (re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host")[:40]


def process_marker() -> str:
    """``llmm-PID-START-HOST``: this process in a temporary's name (PID, start time in whole seconds, host)."""
    pid = os.getpid()
    if pid not in _MARKER:  # per process: a forked child has its own
        start = process_start()
        _MARKER[pid] = f"llmm-{pid}-{int(start if start is not None else time.time())}-{host_name()}"
    return _MARKER[pid]


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temporary name next to ``path``: ``.NAME.MARKER.RAND.KIND`` (nothing is created)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{process_marker()}.{secrets.token_hex(4)}.{kind}")
        if not os.path.lexists(tmp):
            return tmp


def scratch_dir(kind: str, parent: str | os.PathLike | None = None) -> Path:
    """Create a private scratch directory ``llm-merging-KIND.MARKER.RAND.tmp`` in ``parent`` (default
    ``$TMPDIR``); the caller removes it."""
    parent = Path(parent or tempfile.gettempdir())
    while True:
        path = parent / f"llm-merging-{kind}.{process_marker()}.{secrets.token_hex(4)}.tmp"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def scratch_directory(kind: str) -> Iterator[str]:
    """``tempfile.TemporaryDirectory`` with a marked name (:func:`scratch_dir`): yields its path, removes it."""
    path = scratch_dir(kind)
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_path(tmp: Path, path: Path) -> None:
    """Rename the finished temporary ``tmp`` onto ``path`` (a directory target is replaced whole: the old
    one is moved to ``.NAME.MARKER.old`` first and removed after)."""
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(f".{path.name}.{process_marker()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


#: errors of ``os.copy_file_range`` that mean "not here" (another file system, an old kernel, a file kind
#: it does not take): the bytes are then copied through memory
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


def copy_span(src: str | os.PathLike, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` bytes of file ``src`` from ``src_offset`` into the open file ``dst_fd`` at ``dst_offset``:
    in the kernel (``os.copy_file_range``: no pass through this process's memory) where the system allows,
    else through a 16 MiB buffer. Raises OSError when ``src`` ends early."""
    with open(src, "rb", buffering=0) as fh:
        fd = fh.fileno()
        in_kernel = hasattr(os, "copy_file_range")
        while nbytes > 0:
            if in_kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, min(nbytes, 1 << 30), src_offset, dst_offset)
                except OSError as exc:
                    if exc.errno not in _NO_COPY_RANGE:
                        raise
                    n = 0
                if n <= 0:  # some file systems answer 0 for "not here": the buffer decides
                    in_kernel = False
                    continue
            else:
                chunk = os.pread(fd, min(nbytes, 16 << 20), src_offset)
                n = len(chunk)
                view = memoryview(chunk)
                while view.nbytes:
                    w = os.pwrite(dst_fd, view, dst_offset + n - view.nbytes)
                    if w <= 0:
                        raise OSError(f"cannot write the copy of {src} (pwrite returned {w})")
                    view = view[w:]
            if n <= 0:
                raise OSError(f"{src} ends {nbytes} bytes early")
            src_offset, dst_offset, nbytes = src_offset + n, dst_offset + n, nbytes - n


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree (nothing when it is not there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (:func:`temp_path`); rename it onto ``path`` only if the
    block succeeds, else remove it.

    Works for files and directories (a directory target is replaced whole).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        remove_path(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a text file by rewriting it atomically (files here are small)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + line.rstrip("\n") + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: dataclasses and ``to_dict()`` objects as dicts, paths as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return str(obj)


def check_output_folder(path: Path) -> None:
    """Fail early (one line) when the output folder cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path / "write-test")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"output folder '{path}' is not writable: {exc.strerror or exc}") from None


def check_new_dir(path: str | os.PathLike, label: str, inputs: tuple = ()) -> Path:
    """A directory a command is to create (``label`` names its flag or argument in the errors): it must not
    exist or be an empty directory, and be none of ``inputs`` (nor hold one). One-line ConfigError
    otherwise; returns the path."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{label} '{out}' is an existing file; give a new or empty directory")
    target = out.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if target == src or target in src.parents:
            raise ConfigError(f"{label} '{out}' overlaps the input '{given}'; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{label} '{out}' is not empty; give a new or empty directory")
    return out


def read_yaml_documents(path: str | os.PathLike, label: str) -> list[tuple[int, Any]]:
    """``yaml.safe_load_all`` of a file as ``(document number, document)``, empty documents left out (a
    trailing ``---``); one-line ConfigErrors start with ``label`` (e.g. ``recipe PATH``) and give the line."""
    import yaml  # pyyaml: only the commands that read YAML load it

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{label}: not valid YAML{at}: {getattr(exc, 'problem', None) or first_line(exc)}") from None
    return [(i, doc) for i, doc in enumerate(docs, start=1) if doc is not None]


def check_keys(label: str, where: str, obj: Any, allowed: set[str]) -> dict:
    """``obj`` as a mapping whose keys are all in ``allowed``; else a one-line ConfigError
    ``"{label}: {where}.{key}: unknown key (known: ...)"`` (keys of any type)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{label}: {where or 'top level'}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        at = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{label}: {at}: unknown key (known: {', '.join(sorted(allowed))})")
    return obj
