"""One run's hold on its output folders (``OUTPUT/METHOD/``): an advisory lock (one run per folder), the
removal of temporaries that runs which are gone left behind, the manifest of what this run wrote, and the
disk space its outputs need.

* **Lock**: ``.llm-merging.lock`` in the folder, held with ``fcntl.flock`` for the whole run and removed at
  its end; it records the holder (pid, host, start, command). The kernel drops the lock of a process that
  died, so a dead holder's lock is simply taken over (and said so). A file system without locks (ENOLCK,
  EOPNOTSUPP, ENOSYS, EINVAL: some NFS and Lustre mounts) gets one warning and the run goes on unlocked.
  On NFS the lock may hold only on the host that took it (it depends on the mount).
* **Stale temporaries**: temporaries carry their creator's marker (:func:`llm_merging.core.io.process_marker`);
  those of a process that is gone (same host; pid not running, or running but started at another time) are
  removed when a run claims the folder. Nothing else is touched: not a live run's, not another host's
  (named in the log and in ``skipped``), not a file that does not match the exact pattern, and, when the
  run resumes, not an interrupted merge (a ``.tmp`` directory with its ``.journal``) that ``--resume`` could
  continue. Removing such a merge is said by name.
* **Order**: :meth:`OutputFolders.lock` takes the folder first (it creates the folder, when missing, and the
  lock file, nothing else); :meth:`OutputFolders.claim` then removes the stale temporaries and records the
  folder's files. A run refused in between leaves nothing: the lock file and the folders it created (when
  still empty) are removed as it releases them.
* **Manifest**: the folder's files are recorded when it is claimed; at the end, every file that is new or
  changed is this run's (``written``: bytes and sha256), every other one an earlier run's (``earlier``).
* **Disk space**: `check_space` compares what the outputs need with the free bytes of each file system.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import psutil

from llm_merging.core.errors import OutputError
from llm_merging.core.io import (SCRATCH_NAME, TEMP_NAME, check_output_folder, host_name, process_start,
                                 remove_path)

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".llm-merging.lock"
#: flock errors of a file system that does not lock (some NFS and Lustre mounts): the run goes on unlocked
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


# ------------------------------------------------------------------------------------------- owners
def owner_alive(pid: int, start: int, host: str) -> bool:
    """Whether the process that made a marked temporary may still run: True for another host (we cannot
    tell) and for a running process (not a zombie) with that pid that started within a second of ``start``."""
    if host != host_name():
        return True
    if pid == os.getpid():
        mine = process_start()
        return mine is None or abs(int(mine) - start) <= 1
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: gone
            return False
        return abs(int(process.create_time()) - start) <= 1
    except psutil.NoSuchProcess:
        return False
    except Exception:  # access denied and the like: it runs, and it may be the owner
        return True


def _owner(match) -> tuple[int, int, str]:
    return int(match["pid"]), int(match["start"]), match["host"]


def is_temporary(name: str) -> bool:
    """Whether ``name`` (a file or directory name) is one of our marked temporaries."""
    return TEMP_NAME.match(name) is not None


# ------------------------------------------------------------------------------------------- sweep
def sweep(folder: Path, *, keep: Iterable[Path] = (), own: bool = False, recursive: bool = True,
          scratch: bool = False, resuming: bool = False, dry_run: bool = False,
          skipped: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Remove the marked temporaries under ``folder`` whose process is gone (``own``: this process's too)
    and return what was done, one ``{"path", "pid", "host", "action"}`` per entry (``"resumable": True``
    for an interrupted merge: a ``.tmp`` directory with its ``.journal``). ``keep``: paths left alone (e.g.
    an interrupted merge to resume). ``resuming``: every interrupted merge is left alone too. ``scratch``:
    ``folder`` is ``$TMPDIR`` (only our scratch directories there, not recursively). A
    ``.NAME.MARKER.old`` (a directory being replaced) is put back as ``NAME`` when ``NAME`` is missing, else
    removed. ``dry_run``: nothing is touched; the entries say what would be removed and its ``bytes``.
    ``skipped``: receives ``{"path", "pid", "host", "reason"}`` for each temporary of another process left
    alone (another host's, a live process's, one kept for --resume), ``keep`` not included."""
    folder = Path(folder)
    keep = {Path(k).resolve() for k in keep}
    done: list[dict[str, Any]] = []
    pattern = SCRATCH_NAME if scratch else TEMP_NAME
    me, here = os.getpid(), host_name()
    for root, dirs, files in _walk(folder, recursive and not scratch):
        names = sorted(dirs + files)
        journalled = set() if scratch else _journalled(root, names)
        for name in names:
            m = pattern.match(name)
            if m is None:
                continue
            path = root / name
            pid, start, host = _owner(m)
            alive = owner_alive(pid, start, host)
            mine = alive and pid == me and host == here
            resumable = name in journalled
            kept = path.resolve() in keep
            if kept or (alive and not (own and mine)) or (resuming and resumable):
                dirs[:] = [d for d in dirs if d != name]
                if skipped is not None and not kept and not mine:
                    reason = ("kept for --resume" if not alive else
                              "made on another host, where this host cannot tell whether its process runs"
                              if host != here else "its process still runs")
                    skipped.append({"path": str(path), "pid": pid, "host": host, "reason": reason,
                                    **({"resumable": True} if resumable else {})})
                continue
            dirs[:] = [d for d in dirs if d != name]
            entry: dict[str, Any] = {"path": str(path), "pid": pid, "host": host}
            if resumable:
                entry["resumable"] = True
            target = root / m["name"] if not scratch else None
            restore = m["kind"] == "old" and target is not None and not os.path.lexists(target)
            if dry_run:
                entry.update(action="would restore" if restore else "would remove",
                             bytes=0 if restore else disk_usage(path))
                done.append(entry)
                continue
            action = "removed"
            if restore:
                try:
                    os.replace(path, target)
                    action = "restored"
                except OSError:
                    remove_path(path)
            else:
                remove_path(path)
            done.append({**entry, "action": action})
    if done and not dry_run:
        owners = sorted({d["pid"] for d in done})
        what = "left by a process that is gone" if not own else "of this run or of processes that are gone"
        (logger.info if own else logger.warning)(
            "removed %d temporar%s %s (pid %s): %s", len(done), "y" if len(done) == 1 else "ies", what,
            ", ".join(map(str, owners)),
            ", ".join(f"{d['path']}" + (" (restored)" if d["action"] == "restored" else "") for d in done))
        for d in done:
            if d.get("resumable") and d["path"].endswith(".tmp"):
                logger.warning("removed the interrupted merge %s (pid %s on %s) and its journal, which --resume "
                               "could have continued: this run does not resume", d["path"], d["pid"], d["host"])
    return done


def _journalled(root: Path, names: list[str]) -> set[str]:
    """The interrupted merges among ``names``: each ``.tmp`` directory that has its ``.journal``, and that
    journal (``llm_merging.model.save.journal_of``)."""
    out = set()
    for name in names:
        m = TEMP_NAME.match(name)
        if m is not None and m["kind"] == "journal":
            tmp = name[: -len(".journal")] + ".tmp"
            if (root / tmp).is_dir():
                out |= {name, tmp}
    return out


def disk_usage(path: Path) -> int:
    """The bytes a file or directory tree takes on disk (allocated blocks; 0 when it is gone)."""
    total = 0
    try:
        if not Path(path).is_dir() or Path(path).is_symlink():
            return Path(path).lstat().st_blocks * 512
        for root, _, files in os.walk(path):
            for name in files:
                try:
                    total += (Path(root) / name).lstat().st_blocks * 512
                except OSError:
                    continue
    except OSError:
        return total
    return total


def _walk(folder: Path, recursive: bool):
    """(directory, [sub-directory names], [file names]) under ``folder``; the caller prunes the list of
    sub-directories it must not enter."""
    if not folder.is_dir():
        return
    if not recursive:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        yield folder, dirs, [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
        return
    for root, dirs, files in os.walk(folder):
        yield Path(root), dirs, files


# ------------------------------------------------------------------------------------------- lock
@dataclass
class FolderLock:
    """The advisory lock of one output folder (see the module docstring)."""

    folder: Path
    fd: int | None = None
    taken_over: dict[str, Any] | None = None  # the previous holder's record, when it died holding it
    unsupported: str | None = None  # why the file system cannot lock (the run goes on unlocked)
    found: bytes | None = None  # the lock file's content before this run took it (None: this run created it)

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self, command: list[str] | None = None) -> None:
        """Take the lock or raise OutputError (one line naming the holder's pid). On a file system that
        cannot lock (`NO_LOCKS`), ``unsupported`` says why and the folder is not locked (the caller warns)."""
        if fcntl is None:  # pragma: no cover
            self.unsupported = "no fcntl on this platform"
            return
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # its holder removed it meanwhile: again
                    continue
                created = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCKS:
                    if created:
                        _unlink(self.path)
                    self.unsupported = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
                    return
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    if created:
                        _unlink(self.path)
                    raise OutputError(f"output folder '{self.folder}': cannot lock {self.path}: "
                                      f"{exc.strerror or exc}") from None
                holder = self._holder()
                who = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder.get("pid") else "another process")
                since = f", since {holder['since']}" if holder.get("since") else ""
                raise OutputError(f"output folder '{self.folder}' is in use by another run ({who}{since}); "
                                  "wait for it to end or choose another --output_folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as it released it: take the new one
                os.close(fd)
                continue
            try:
                self.found = None if created else os.pread(fd, 1 << 16, 0)
            except OSError:
                self.found = b""
            previous = self._read(fd)
            if previous.get("pid"):
                self.taken_over = previous
                elsewhere = previous.get("host") not in (None, host_name())
                logger.warning("output folder '%s': took over the lock of run pid %s on %s, which is gone%s",
                               self.folder, previous.get("pid"), previous.get("host"),
                               " (or runs on a host whose locks this one does not see, as on some NFS mounts)"
                               if elsewhere else "")
            record = {"pid": os.getpid(), "host": host_name(), "started": process_start(),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(command or [])}
            data = (json.dumps(record) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise OutputError(f"output folder '{self.folder}': cannot take its lock {self.path} (it keeps changing)")

    def _holder(self) -> dict[str, Any]:
        for _ in range(50):  # a holder that just took the lock writes its record right after
            try:
                with open(self.path, encoding="utf-8") as fh:
                    record = json.loads(fh.read() or "{}")
                if record.get("pid"):
                    return record
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        return {}

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            raw = os.pread(fd, 1 << 16, 0)
            return json.loads(raw.decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def release(self, restore: bool = False) -> None:
        """Remove the lock file and drop the lock (removed first: a waiting run then takes a fresh file).
        ``restore``: leave the lock file as this run found it instead (removed when this run created it,
        else its earlier content put back, e.g. a dead holder's record)."""
        if self.fd is None:
            return
        if restore and self.found is not None:
            try:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, self.found, 0)
            except OSError:
                _unlink(self.path)
        else:
            _unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------- manifest
def _files(folder: Path) -> dict[str, os.stat_result]:
    """Every file under ``folder`` (relative path -> stat), without the lock and our temporaries."""
    out = {}
    for root, dirs, files in _walk(folder, True):
        dirs[:] = [d for d in dirs if not is_temporary(d)]
        for name in files:
            if name == LOCK_NAME or is_temporary(name):
                continue
            path = root / name
            try:
                out[str(path.relative_to(folder))] = path.lstat()
            except OSError:
                continue
    return out


def _key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Claim:
    folder: Path
    lock: FolderLock
    created: list[Path] = field(default_factory=list)  # folders this run created for it, deepest first
    before: dict[str, tuple] | None = None  # relative path -> stat key, once claimed (None: only locked)


@dataclass
class OutputFolders:
    """The output folders a run holds (its ``OUTPUT/METHOD/``; with a search, every searched method's)."""

    claims: dict[Path, Claim] = field(default_factory=dict)
    keep: set[Path] = field(default_factory=set)  # temporaries to leave (an interrupted merge to resume)
    resuming: bool = False  # the run resumes: no interrupted merge is removed
    removed: list[dict[str, Any]] = field(default_factory=list)  # stale temporaries removed
    skipped: list[dict[str, Any]] = field(default_factory=list)  # other processes' temporaries left alone
    taken_over: list[dict[str, Any]] = field(default_factory=list)  # locks of dead runs taken over
    unlocked: list[dict[str, Any]] = field(default_factory=list)  # folders whose file system cannot lock
    resumable: list[dict[str, Any]] = field(default_factory=list)  # merges this run kept for --resume
    _hashes: dict[tuple, str] = field(default_factory=dict)

    def _held(self, folder: Path) -> Claim | None:
        folder = Path(folder).resolve()
        return next((c for f, c in self.claims.items() if f.resolve() == folder), None)

    def holds(self, folder: Path) -> bool:
        """Whether this run holds the lock of ``folder`` (False on a file system that cannot lock)."""
        claim = self._held(folder)
        return claim is not None and claim.lock.fd is not None

    def lock(self, folder: Path, command: list[str] | None = None) -> None:
        """Take ``folder`` for this run: create it when missing (ConfigError when it cannot be written) and
        lock it (OutputError when another run holds it). Nothing else is created or removed. No-op for a
        folder already held."""
        folder = Path(folder)
        if self._held(folder) is not None:
            return
        created, parent = [], folder.absolute()
        while not parent.exists() and parent != parent.parent:
            created.append(parent)
            parent = parent.parent
        lock = FolderLock(folder)
        try:
            check_output_folder(folder)  # created (with its parents), and writable
            lock.acquire(command)
        except BaseException:
            _remove_empty(created)
            raise
        self.claims[folder] = Claim(folder, lock, created)
        if lock.taken_over:
            self.taken_over.append({"folder": str(folder), **{k: lock.taken_over.get(k) for k in ("pid", "host", "since")}})
        if lock.unsupported:
            if not self.unlocked:  # one warning per run
                logger.warning("output folder '%s': its file system cannot lock files (%s); going on without a "
                               "lock: make sure no other run uses this folder", folder, lock.unsupported)
            self.unlocked.append({"folder": str(folder), "why": lock.unsupported})

    def freeable(self, folder: Path) -> list[tuple[Path, int, str]]:
        """What :meth:`claim` will free by removing stale temporaries (under ``folder`` and, for a first
        claim, in $TMPDIR), as ``(folder, -bytes, what)`` for `check_space`; nothing is touched."""
        out = []
        gone = sweep(folder, keep=self.keep, resuming=self.resuming, dry_run=True)
        if gone:
            out.append((Path(folder), -sum(d["bytes"] for d in gone), "freed by removing stale temporaries"))
        if not any(c.before is not None for c in self.claims.values()):
            tmp = Path(tempfile.gettempdir())
            scratch = sweep(tmp, scratch=True, dry_run=True)
            if scratch:
                out.append((tmp, -sum(d["bytes"] for d in scratch), "freed by removing stale scratch directories"))
        return out

    def claim(self, folder: Path, command: list[str] | None = None) -> None:
        """Make ``folder`` this run's: locked (:meth:`lock`, when not yet), the stale temporaries there (and
        our stale scratch directories in $TMPDIR, on the first claim) removed, its files recorded for the
        manifest. No-op for a folder already claimed."""
        self.lock(folder, command)
        claim = self._held(folder)
        if claim.before is not None:
            return
        first = not any(c.before is not None for c in self.claims.values())
        skipped: list[dict[str, Any]] = []
        self.removed += sweep(claim.folder, keep=self.keep, resuming=self.resuming, skipped=skipped)
        if first:
            self.removed += sweep(Path(tempfile.gettempdir()), scratch=True)
        if skipped:
            logger.warning("output folder '%s': left alone %d temporar%s of other processes: %s", claim.folder,
                           len(skipped), "y" if len(skipped) == 1 else "ies",
                           "; ".join(f"{d['path']} (pid {d['pid']} on {d['host']}: {d['reason']}"
                                     + ("; an interrupted merge: --resume continues it, once no run on that host "
                                        "uses this folder" if d.get("resumable") and d["path"].endswith(".tmp") and d["host"] != host_name()
                                        else "") + ")" for d in skipped))
            self.skipped += skipped
        claim.before = {rel: _key(st) for rel, st in _files(claim.folder).items()}

    def keep_for_resume(self, path: Path, journal: Path, **info: Any) -> None:
        """Leave the interrupted merge ``path`` and its ``journal`` for ``--resume`` (report.json
        ``outputs.resumable`` lists it with ``info``)."""
        self.keep |= {Path(path), Path(journal)}
        if not any(r["path"] == str(path) for r in self.resumable):
            self.resumable.append({"path": str(path), "journal": str(journal), **info})

    def release(self) -> list[dict[str, Any]]:
        """This run's own temporaries removed (except ``keep``), every lock dropped (the lock file removed;
        in a folder only locked, never claimed, put back as it was found), the folders this run created and
        left empty removed; returns what was removed."""
        removed: list[dict[str, Any]] = []
        for claim in self.claims.values():  # (scratch directories in $TMPDIR are removed by their users)
            if claim.before is not None:  # a folder only locked holds nothing of this run's: untouched
                removed += sweep(claim.folder, keep=self.keep, own=True, resuming=self.resuming)
        for claim in self.claims.values():  # a folder only locked (a refused run's) is left as it was found
            claim.lock.release(restore=claim.before is None)
            _remove_empty(claim.created)
        self.claims = {}
        return removed

    def manifest(self, out_dir: Path, expected: Iterable[str] = ()) -> dict[str, Any]:
        """``written``: every file under the held folders that is new or changed since they were claimed
        (path relative to ``out_dir``: bytes, sha256); ``earlier``: every other file there (an earlier
        run's); ``not_produced``: the ``expected`` outputs (paths relative to ``out_dir``, folders ending
        in ``/``) this run did not write. report.json itself is always this run's and is not listed."""
        t0 = time.time()
        written: dict[str, dict[str, Any]] = {}
        earlier: list[str] = []
        for claim in self.claims.values():
            if claim.before is None:  # only locked (a searched method that did not win): not this run's output
                continue
            for rel, st in sorted(_files(claim.folder).items()):
                path = claim.folder / rel
                name = os.path.relpath(path, out_dir)
                if rel == "report.json" and claim.folder.resolve() == Path(out_dir).resolve():
                    continue  # this run's, always (the manifest is in it)
                if claim.before.get(rel) == _key(st):
                    earlier.append(name)
                    continue
                key = _key(st)
                if key not in self._hashes:
                    try:
                        self._hashes[key] = sha256_file(path)
                    except OSError:
                        continue
                written[name] = {"bytes": st.st_size, "sha256": self._hashes[key]}
        missing = []
        for item in expected:
            is_dir = str(item).endswith("/")
            name = os.path.normpath(str(item))
            prefix = name + "/"
            if name in written or (is_dir and any(w.startswith(prefix) for w in written)):
                continue
            label = prefix if is_dir else name
            if label not in missing:
                missing.append(label)
        out: dict[str, Any] = {"written": written, "not_produced": missing, "earlier": earlier}
        out["seconds"] = round(time.time() - t0, 3)
        return out


def _remove_empty(folders: Iterable[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


# ------------------------------------------------------------------------------------------- disk space
def free_bytes(path: Path) -> int:
    """Free bytes for this user on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def _device(path: Path) -> tuple[int, Path]:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev, path


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def check_space(needs: Iterable[tuple[Path, int, str]]) -> dict[str, Any]:
    """``needs``: (folder, bytes, what) of every output and temporary spill. Sums them per file system and
    raises OutputError (one line: the folder, the bytes needed and free) where they do not fit; returns
    the estimate per folder for report.json."""
    by_device: dict[int, dict[str, Any]] = {}
    for folder, nbytes, what in needs:
        dev, _ = _device(folder)
        entry = by_device.setdefault(dev, {"folder": Path(folder), "bytes": 0, "what": []})
        entry["bytes"] += int(nbytes)
        if nbytes > 0 and what not in entry["what"]:
            entry["what"].append(what)
    report = {}
    for entry in by_device.values():
        need = max(entry["bytes"], 0)
        free = free_bytes(entry["folder"])
        report[str(entry["folder"])] = {"needed_bytes": need, "free_bytes": free, "for": entry["what"]}
        if need > free:
            raise OutputError(f"not enough disk space in '{entry['folder']}': {', '.join(entry['what'])} need "
                              f"{need} bytes ({size_text(need)}) but {free} bytes ({size_text(free)}) are free")
    return report


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or quota (ENOSPC, EDQUOT; also as libraries word it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(exc: BaseException, folder: Path | None = None) -> str:
    """One line for a full disk: where, and that nothing half-written was kept."""
    where = getattr(exc, "filename", None) or folder
    return (f"no space left on the device{f' writing {where}' if where else ''}: free some space or choose "
            "another --output_folder (nothing half-written was kept)")
