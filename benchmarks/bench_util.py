"""Shared helpers of the benchmark scripts: run a command and measure it, find a mergekit executable.

The scripts run as ``python benchmarks/x.py`` (so ``benchmarks/`` is on ``sys.path``) and ``import bench_util``.

Peak memory: Linux carries a process's peak RSS over ``fork``/``vfork`` + ``exec`` into the child (the kernel
records the old address space's high-water mark at ``exec``), so ``wait4`` on a child of a large parent (one
that imported torch or holds tensors) reports at least the parent's size. :func:`run_measured` therefore starts
the command from a small launcher (a bare Python interpreter, about 10 MiB) that calls ``os.wait4`` on it and
hands back the child's own resource usage: the figures are the command's own, whatever the size of the caller.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping

#: The launcher: runs argv[2:] as a child, waits for it with wait4 and writes its usage to fd argv[1].
_LAUNCHER = (
    "import json, os, subprocess, sys, time\n"
    "fd = int(sys.argv[1])\n"
    "t0 = time.perf_counter()\n"
    "try:\n"
    "    p = subprocess.Popen(sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    print(f'{sys.argv[2]}: {exc}', file=sys.stderr)\n"
    "    os.write(fd, json.dumps({'rc': 127, 'wall': 0.0, 'maxrss_kib': 0, 'user': 0.0, 'sys': 0.0, 'minflt': 0,\n"
    "                             'majflt': 0}).encode())\n"
    "    sys.exit(127)\n"
    "while True:\n"
    "    try:\n"
    "        _, status, ru = os.wait4(p.pid, 0); break\n"
    "    except KeyboardInterrupt:\n"
    "        continue  # the child got the same SIGINT; wait for it to end\n"
    "wall = time.perf_counter() - t0\n"
    "os.write(fd, json.dumps({'rc': os.waitstatus_to_exitcode(status), 'wall': wall, 'maxrss_kib': ru.ru_maxrss,\n"
    "                         'user': ru.ru_utime, 'sys': ru.ru_stime, 'minflt': ru.ru_minflt,\n"
    "                         'majflt': ru.ru_majflt}).encode())\n"
)


@dataclass(frozen=True)
class Measured:
    """What :func:`run_measured` returns; unpacks as ``returncode, wall_s, peak_rss_bytes``."""

    returncode: int  #: the command's exit status (negative: killed by that signal)
    wall_s: float  #: wall seconds from its start to its end
    peak_rss_bytes: int  #: its own peak resident set size (``ru_maxrss``)
    user_s: float = 0.0  #: user CPU seconds (its threads and any children it waited for)
    sys_s: float = 0.0  #: system CPU seconds
    minor_faults: int = 0
    major_faults: int = 0

    def __iter__(self) -> Iterator:
        return iter((self.returncode, self.wall_s, self.peak_rss_bytes))

    @property
    def peak_rss_mib(self) -> float:
        return self.peak_rss_bytes / 2**20

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_measured(cmd: list[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 log: str | os.PathLike | IO | None = None, sync_first: bool = True) -> Measured:
    """Run ``cmd`` in a fresh process and measure it: ``(returncode, wall_s, peak_rss_bytes)`` (a :class:`Measured`,
    which also has CPU seconds and page faults). ``env``/``cwd`` as for :class:`subprocess.Popen`; ``log``: a path
    or an open file that gets the command's stdout and stderr (default: this process's). A command that cannot
    be started gives return code 127 (its error in ``log``) and zeros. ``sync_first``: flush the disk writes
    earlier runs left to the kernel before starting (untimed), so that they do not slow this run."""
    if sync_first:
        os.sync()
    read_fd, write_fd = os.pipe()
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(write_fd), *map(str, cmd)]
    fh = open(log, "w") if isinstance(log, (str, os.PathLike)) else log
    try:
        proc = subprocess.Popen(launcher, stdout=fh, stderr=subprocess.STDOUT if fh is not None else None,
                                env=dict(env) if env is not None else None, cwd=cwd, pass_fds=(write_fd,))
        os.close(write_fd)
        write_fd = -1
        with os.fdopen(read_fd, "rb") as pipe:
            read_fd = -1
            report = pipe.read()
        proc.wait()
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if fh is not None and fh is not log:
            fh.close()
    if not report:
        raise RuntimeError(f"the measuring launcher of {cmd[0]} ended ({proc.returncode}) without a report")
    r = json.loads(report)
    return Measured(r["rc"], r["wall"], r["maxrss_kib"] * 1024, r["user"], r["sys"], r["minflt"], r["majflt"])


def find_mergekit(tool: str, given: str | None = None) -> str | None:
    """The executable ``tool`` (``mergekit-yaml``, ``mergekit-moe``, ...): from ``given`` (a ``--mergekit`` option:
    a virtual environment, whose ``bin/tool`` is taken, or an executable), else ``$MERGEKIT_VENV/bin/tool``, else
    ``tool`` on PATH; None when absent."""
    def executable(path: Path) -> str | None:
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None

    if given:
        p = Path(given).expanduser()
        return executable(p / "bin" / tool) if p.is_dir() else (executable(p) or shutil.which(given))
    venv = os.environ.get("MERGEKIT_VENV")
    return (executable(Path(venv).expanduser() / "bin" / tool) if venv else None) or shutil.which(tool)


def log_tail(log: str | os.PathLike, lines: int = 8) -> str:
    """The last ``lines`` lines of a log file (for a failure message), indented one per line."""
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return f"(no log at {log})"
    return "\n  ".join(text[-lines:])
