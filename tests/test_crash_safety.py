"""Crash safety: real processes killed with SIGKILL during a merge, a save and a search trial (the next run
cleans up, a resumed merge equals the uninterrupted one byte for byte), a budget stop (kept for --resume) and
another host's merge, a full disk, two runs into one output folder (and a search's folders), a file system
without locks, a refused run, SIGTERM/SIGINT during evaluation, stale temporaries and the manifest of what a
run wrote."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import REPO_ROOT

from llm_merging.core import outputs
from llm_merging.core.budget import Budget
from llm_merging.core.io import atomic_path, host_name, process_marker, process_start
from llm_merging.core.outputs import LOCK_NAME, FolderLock, sweep
from llm_merging.main import main
from llm_merging.merging.Merges import Merges
from llm_merging.model import tiny
from llm_merging.pipeline import RunConfig, Runner

TESTS = os.path.dirname(os.path.abspath(__file__))
BASE = ["--base-model", str(tiny.base_dir("decoder"))]
FULL = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
LORA = [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]


# ------------------------------------------------------------------------------------------- helpers
def _spawn(args, cwd, delay, progress=None):
    """The CLI in a child process, its steps slowed by ``delay`` s (tests/crash_methods.py)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
               CRASH_DELAY=str(delay), CRASH_PROGRESS=str(progress or Path(cwd) / "progress"))
    with open(Path(cwd) / "child.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "llm_merging", "main.py"), *args],
                                env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT)


def _wait(proc, ready, cwd, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the point to stop it:\n"
                                 + (Path(cwd) / "child.log").read_text(errors="replace")[-3000:])
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run never reached the point to stop it")


def _kill(proc, sig=signal.SIGKILL, timeout=120):
    os.kill(proc.pid, sig)  # only the process this test started, by its id
    return proc.wait(timeout=timeout)


def _journal_entries(run_dir: Path) -> int:
    counts = [len(f.read_bytes().split(b"\n")) - 2 for f in run_dir.glob(".merged_model.*.journal")]
    return max(counts, default=0)


def _steps(cwd) -> list[str]:
    path = Path(cwd) / "progress"
    return path.read_text().splitlines() if path.exists() else []


def _hidden(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith("."))


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _merge_args(models):
    return ["-m", "crash_methods:SlowTies", *BASE, "--models", *models, "--no-eval", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted merges (in this process, no delay), by kind of experts."""
    out = tmp_path_factory.mktemp("reference")
    done = {}
    for kind, models in (("full", FULL), ("lora", LORA)):
        assert main([*_merge_args(models), "--output_folder", str(out / kind)]) == 0
        done[kind] = _digests(out / kind / "SlowTies" / "merged_model")
    return done


# ------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.parametrize("kind,kill_after,resume", [("full", 1, True), ("full", 9, True), ("lora", 5, True),
                                                    ("full", 3, False)])
def test_killed_streamed_merge_resumes_byte_for_byte(tmp_path, capsys, reference, kind, kill_after, resume):
    args = [*_merge_args(FULL if kind == "full" else LORA), "--output_folder", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "SlowTies"
    proc = _spawn(args, tmp_path, delay=0.25)
    try:
        _wait(proc, lambda: _journal_entries(run_dir) >= kill_after, tmp_path)
        if kill_after == 1:  # meanwhile, a second run into the same folder is refused, naming the holder
            capsys.readouterr()
            assert main(args) == 2
            err = _err(capsys)
            assert len(err) == 1 and err[0].startswith("error: output folder") and f"pid {proc.pid}" in err[0], err
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    left = _hidden(run_dir)
    assert LOCK_NAME in left and any(n.endswith(".tmp") for n in left) and any(n.endswith(".journal") for n in left)
    done = _journal_entries(run_dir)
    assert done >= kill_after
    if kill_after == 9:  # a changed option refuses to resume, with one line, and touches nothing
        capsys.readouterr()
        assert main([*args, "--set", "density=0.3", "--resume"]) == 2
        err = _err(capsys)
        assert len(err) == 1 and "--resume" in err[0] and "density" in err[0], err
        assert _hidden(run_dir) == left
    assert main([*args, "--resume"] if resume else args) == 0
    report = _report(run_dir)
    assert _digests(run_dir / "merged_model") == reference[kind]  # byte for byte the uninterrupted merge
    assert report["outputs"]["locks_taken_over"][0]["pid"] == proc.pid
    removed = report["outputs"]["removed_temporaries"]
    if resume:
        assert report["resumed"]["tensors_done"] == done and report["merge_stats"]["tensors_resumed"] == done
        assert removed == []
    else:  # the killed run's temporary directory and journal are removed, and said so
        assert "resumed" not in report and "tensors_resumed" not in report["merge_stats"]
        assert sorted(Path(r["path"]).suffix for r in removed) == [".journal", ".tmp"]
        assert {r["pid"] for r in removed} == {proc.pid}
    assert _hidden(run_dir) == []


def test_killed_during_save_the_next_run_cleans_up(tmp_path):
    data = tiny.sample_data_files()[:1]
    args = ["-m", "crash_methods:SlowSave", "--tiny", "--quiet", "--max-examples", "1", "-d", *data,
            "--output_folder", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "SlowSave"
    proc = _spawn(args, tmp_path, delay=1.0)
    try:
        _wait(proc, lambda: "saved" in _steps(tmp_path), tmp_path)  # the model is in its temporary directory
    finally:
        if proc.poll() is None:
            _kill(proc)
    stale = [n for n in _hidden(run_dir) if n.startswith(".merged_model.")]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0] and not (run_dir / "merged_model").exists()
    assert main(args) == 0
    report = _report(run_dir)
    removed = report["outputs"]["removed_temporaries"]
    assert [Path(r["path"]).name for r in removed] == stale and removed[0]["pid"] == proc.pid
    assert report["outputs"]["locks_taken_over"][0]["pid"] == proc.pid
    assert (run_dir / "merged_model" / "model.safetensors").is_file() and _hidden(run_dir) == []


def test_killed_search_trial_the_resumed_search_goes_on(tmp_path):
    args = ["-m", "crash_methods:SlowTies", "--tiny", "--no-eval", "--save", "none", "--quiet", "--search",
            "density=0.1:0.9", "--trials", "3", "--search-examples", "2", "--output_folder", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "SlowTies"
    proc = _spawn(args, tmp_path, delay=0.03)
    try:  # each candidate merges 14 tensors: stop in the middle of the second trial
        _wait(proc, lambda: sum(s.startswith("tensor") for s in _steps(tmp_path)) >= 20, tmp_path)
    finally:
        if proc.poll() is None:
            _kill(proc)
    assert (run_dir / "search" / "journal.log").is_file() and LOCK_NAME in _hidden(run_dir)
    assert main([*args, "--resume"]) == 0
    report = _report(run_dir)
    assert report["status"] == "ok" and report["outputs"]["locks_taken_over"][0]["pid"] == proc.pid
    search = report["search"]
    assert search["trials_before"] >= 1 and search["trials"]["fail"] >= 1  # the killed trial, marked failed
    assert "search/trials.csv" in report["outputs"]["written"] and _hidden(run_dir) == []


# ------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_evaluation_keeps_finished_work(tmp_path, sig, code):
    args = ["-m", "crash_methods:SlowEval", "--tiny", "--quiet", "--batch-size", "1", "--max-examples", "6",
            "--output_folder", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "SlowEval"
    proc = _spawn(args, tmp_path, delay=0.4)
    try:
        _wait(proc, lambda: _steps(tmp_path).count("batch") >= 2, tmp_path)
        assert _kill(proc, sig) == code, (tmp_path / "child.log").read_text()
    finally:
        if proc.poll() is None:
            _kill(proc)
    log = (tmp_path / "child.log").read_text()
    assert log.strip().splitlines()[-1] == f"error: interrupted ({'Ctrl-C' if code == 130 else 'SIGTERM'}); " \
                                           "finished work was kept"
    report = _report(run_dir)
    assert report["exit_status"] == code and report["status"] == "partial" and report["partial"] is True
    assert report["interrupted"] == signal.Signals(sig).name
    datasets = report["evaluation"]["datasets"]
    assert datasets[0]["partial"] and 0 < datasets[0]["n_evaluated"] < datasets[0]["n_examples"]
    for ds in datasets:  # the predictions on disk are exactly the evaluated examples
        rows = Path(ds["predictions_path"]).read_text().splitlines()
        assert len(rows) == ds["n_evaluated"] and all("prediction" in json.loads(r) for r in rows)
    assert (run_dir / "merged_model" / "model.safetensors").is_file()  # saved before the evaluation
    assert "merged_model/model.safetensors" in report["outputs"]["written"]
    assert _hidden(run_dir) == []


def test_interrupted_streamed_merge_is_kept_for_resume(tmp_path, reference):
    args = [*_merge_args(FULL), "--output_folder", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "SlowTies"
    proc = _spawn(args, tmp_path, delay=0.25)
    try:
        _wait(proc, lambda: _journal_entries(run_dir) >= 2, tmp_path)
        assert _kill(proc, signal.SIGTERM) == 143
    finally:
        if proc.poll() is None:
            _kill(proc)
    report = _report(run_dir)
    assert report["interrupted"] == "SIGTERM" and "resumable" not in report
    [kept] = report["outputs"]["resumable"]
    assert kept["tensors_done"] >= 2 and kept["stopped_by"] == "SIGTERM"
    assert Path(kept["path"]).suffix == ".tmp" and Path(kept["journal"]).suffix == ".journal"
    assert kept["continue_with"] == "the same command with --resume"
    assert LOCK_NAME not in _hidden(run_dir)
    assert main([*args, "--resume"]) == 0
    assert _digests(run_dir / "merged_model") == reference["full"] and _hidden(run_dir) == []


# ------------------------------------------------------------------------------------------- budget, other hosts
class _StopAfter(Budget):
    """A budget that runs out after ``calls`` questions (one before the merge phase, then one per tensor)."""

    def __init__(self, calls):
        super().__init__(3600, start=time.time())
        self.calls = calls

    def remaining(self):
        self.calls -= 1
        return -1.0 if self.calls < 0 else super().remaining()


def _to_other_host(path: Path) -> Path:
    """``path`` (a temporary of this process) renamed as if a process on the host 'elsewhere' had made it."""
    other = path.with_name(path.name.replace(f"-{host_name()}.", "-elsewhere."))
    assert other != path
    os.replace(path, other)
    return other


def test_budget_stop_keeps_the_streamed_merge_and_resume_takes_another_hosts(tmp_path, caplog, reference):
    out = tmp_path / "out"
    run_dir = out / "SlowTies"
    cfg = RunConfig(method="crash_methods:SlowTies", base_model=BASE[1], models=FULL, evaluate=False,
                    output_folder=str(out), progress=False)
    assert Runner(cfg, budget=_StopAfter(5)).run() == 3
    report = _report(run_dir)
    assert report["status"] == "partial" and "kept in" in report["error"] and "--resume" in report["error"]
    assert "resumable" not in report
    [kept] = report["outputs"]["resumable"]  # kept, not removed, by a budget stop
    assert kept["stopped_by"] == "budget" and 1 <= kept["tensors_done"] < kept["tensors_total"]
    assert kept["continue_with"] == "the same command with a larger --time-budget and --resume"
    assert Path(kept["path"]).is_dir() and Path(kept["journal"]).is_file() and LOCK_NAME not in _hidden(run_dir)
    # as if a run on another host (or in a container whose host name changed) had left it
    tmp, journal = _to_other_host(Path(kept["path"])), _to_other_host(Path(kept["journal"]))
    args = [*_merge_args(FULL), "--output_folder", str(out)]
    caplog.clear()
    assert main(args) == 0  # without --resume: left alone, and named in the log and the report
    skipped = _report(run_dir)["outputs"]["skipped_temporaries"]
    assert sorted(d["path"] for d in skipped) == sorted([str(journal), str(tmp)])
    assert all(d["host"] == "elsewhere" and d["resumable"] for d in skipped)
    assert str(tmp) in caplog.text and "on elsewhere" in caplog.text
    assert main([*args, "--resume"]) == 0  # this run holds the lock: another host's merge is continued
    report = _report(run_dir)
    assert report["resumed"]["host"] == "elsewhere" and report["resumed"]["tensors_done"] == kept["tensors_done"]
    assert report["merge_stats"]["tensors_resumed"] == kept["tensors_done"]
    assert _digests(run_dir / "merged_model") == reference["full"] and _hidden(run_dir) == []


# ------------------------------------------------------------------------------------------- full disk
def test_enospc_while_writing_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    assert main(["-m", "ties_merge", *BASE, "--models", *FULL, "--no-eval", "--quiet", "--output_folder", str(out)]) == 2
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("error: no space left on the device"), err
    run_dir = out / "ties_merge"
    assert not (run_dir / "merged_model").exists() and _hidden(run_dir) == []
    report = _report(run_dir)
    assert report["disk_full"] is True and report["exit_status"] == 2
    assert {"recipe.yml", "merged_model/"} <= set(report["outputs"]["not_produced"])


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs (the tiny model takes ~860 KiB in float32): needs root and a working mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root and mount (a small tmpfs)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.mark.parametrize("save", ["full", "kit"])
def test_real_enospc_on_a_small_disk(small_disk, capsys, monkeypatch, save):
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 1 << 40)  # past the preflight estimate
    code = main(["-m", "ties_merge", *BASE, "--models", *FULL, "--no-eval", "--quiet", "--save", save,
                 "--output_folder", str(small_disk)])
    err = _err(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: no space left on the device"), err
    run_dir = small_disk / "ties_merge"
    assert not (run_dir / "merged_model").exists() and not (run_dir / "safetensor.pt").exists()
    assert _hidden(small_disk) == []


def test_preflight_refuses_too_little_free_space_before_loading_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 1000)
    runner = Runner(RunConfig(method="ties_merge", tiny=True, evaluate=False, output_folder=str(tmp_path / "out"),
                              progress=False))
    assert runner.run() == 2
    error = runner.report["error"]
    assert error.startswith(f"not enough disk space in '{tmp_path / 'out' / 'ties_merge'}'") and "\n" not in error
    assert "the merged model" in error and "1000 bytes" in error
    need = int(error.split(" need ")[1].split(" bytes")[0])
    assert need > 800_000  # the tiny model in float32, at least
    assert runner.method.base_model is None  # refused before any weight
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []  # nothing written, lock removed
    # the CLI says the same in one line
    assert main(["-m", "ties_merge", "--tiny", "--no-eval", "--quiet", "--output_folder", str(tmp_path / "cli")]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "not enough disk space" in err[0] and "are free" in err[0]


# ------------------------------------------------------------------------------------------- lock
def test_a_dead_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "out" / "ties_merge"
    folder.mkdir(parents=True)
    code = ("import os, signal, sys; from pathlib import Path; from llm_merging.core.outputs import FolderLock; "
            "FolderLock(Path(sys.argv[1])).acquire(['holder']); os.kill(os.getpid(), signal.SIGKILL)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO_ROOT)
    assert holder.wait() == -signal.SIGKILL and (folder / LOCK_NAME).is_file()
    assert main(["-m", "ties_merge", "--tiny", "--no-eval", "--save", "none", "--quiet",
                 "--output_folder", str(tmp_path / "out")]) == 0
    taken = _report(folder)["outputs"]["locks_taken_over"]
    assert [t["pid"] for t in taken] == [holder.pid] and taken[0]["host"] == host_name()
    assert not (folder / LOCK_NAME).exists()


def test_lock_is_exclusive_within_and_across_processes(tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire(["first"])
    try:
        code = ("import sys; from pathlib import Path; from llm_merging.core.outputs import FolderLock; "
                "FolderLock(Path(sys.argv[1])).acquire()")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                               text=True, check=False)
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_file_system_without_locks_runs_unlocked(tmp_path, caplog, monkeypatch):
    real = outputs.fcntl

    def flock(fd, operation):  # what NFS without a lock manager answers
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outputs, "fcntl", types.SimpleNamespace(LOCK_EX=real.LOCK_EX, LOCK_NB=real.LOCK_NB, flock=flock))
    out = tmp_path / "out"
    assert main(["-m", "ties_merge", "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(out)]) == 0
    run_dir = out / "ties_merge"
    report = _report(run_dir)
    assert report["status"] == "ok" and report["outputs"]["lock"] == "unsupported"
    assert report["outputs"]["unlocked"][0]["why"].startswith("ENOLCK")
    warned = [r for r in caplog.records if "cannot lock" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert not (run_dir / LOCK_NAME).exists() and _hidden(run_dir) == []


def test_search_holds_every_searched_methods_folder_before_searching(tmp_path, capsys, monkeypatch):
    def no_weights(self):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Merges, "_load_base_model", no_weights)
    out = tmp_path / "out"
    (out / "task_arithmetic").mkdir(parents=True)
    other = FolderLock(out / "task_arithmetic")  # another run holds the second method's folder
    other.acquire(["another run"])
    try:
        assert main(["-m", "ties_merge", "task_arithmetic", "--search", "--tiny", "--quiet",
                     "--output_folder", str(out)]) == 2
        err = _err(capsys)
        assert len(err) == 1 and "task_arithmetic" in err[0] and f"pid {os.getpid()}" in err[0], err
        assert not (out / "ties_merge").exists()  # the first method's folder: created, then removed again
    finally:
        other.release()


def test_a_refused_run_leaves_the_folder_as_it_found_it(tmp_path, caplog, monkeypatch):
    run_dir = tmp_path / "out" / "ties_merge"
    run_dir.mkdir(parents=True)
    merge_dir = run_dir / f".merged_model.llmm-{_dead_pid()}-1700000000-{host_name()}.0123abcd.tmp"
    merge_dir.mkdir()
    (merge_dir / "model.safetensors").write_bytes(b"\0" * 4096)
    journal = merge_dir.with_suffix(".journal")
    journal.write_text(json.dumps({"journal": 1}) + "\n")
    dead = _dead_pid()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": host_name()}) + "\n")

    def state():
        return {str(p.relative_to(run_dir)): p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}

    before = state()
    freed = outputs.OutputFolders().freeable(run_dir)  # what the sweep would free counts as free space
    assert freed[0][0] == run_dir and freed[0][1] <= -4096
    assert all(f != run_dir for f, _, _ in outputs.OutputFolders(resuming=True).freeable(run_dir))  # --resume keeps it
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 1000)
    args = ["-m", "ties_merge", "--tiny", "--no-eval", "--quiet", "--output_folder", str(tmp_path / "out")]
    assert main(args) == 2  # refused after it held the lock: nothing removed, the lock file as it was
    assert state() == before
    monkeypatch.undo()
    caplog.clear()
    assert main([*args, "--save", "none"]) == 0  # not resuming: the killed merge is removed, and said so by name
    report = _report(run_dir)["outputs"]
    assert sorted(r["path"] for r in report["removed_temporaries"]) == sorted([str(journal), str(merge_dir)])
    assert [t["pid"] for t in report["locks_taken_over"]] == [dead]
    assert f"removed the interrupted merge {merge_dir}" in caplog.text and "does not resume" in caplog.text
    assert _hidden(run_dir) == []


# ------------------------------------------------------------------------------------------- temporaries
def test_sweep_removes_only_dead_processes_temporaries(tmp_path):
    dead, host, me = _dead_pid(), host_name(), process_marker()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(100):
            start = process_start(live.pid)
            if start:
                break
        names = {
            f".merged_model.llmm-{dead}-1700000000-{host}.0123abcd.tmp": "dir",  # dead: removed
            f".report.json.llmm-{dead}-1700000000-{host}.0123abcd.tmp": "file",  # dead: removed
            f".scores.jsonl.{me}.0123abcd.tmp": "file",  # this process: kept
            f".a.llmm-{live.pid}-{int(start)}-{host}.0123abcd.tmp": "file",  # a live run's: kept
            f".b.llmm-{live.pid}-{int(start) - 1000}-{host}.0123abcd.tmp": "file",  # pid reused: removed
            f".c.llmm-{dead}-1700000000-elsewhere.0123abcd.tmp": "file",  # another host: kept
            ".merged_model.k3j_x9a2.tmp": "dir",  # not our pattern (an old version's): kept
            "notes.tmp": "file",
            f".recipe.yml.llmm-{dead}-1700000000-{host}.old": "file",  # restored as recipe.yml
        }
        sub = tmp_path / "predictions"
        sub.mkdir()
        (sub / f".x.jsonl.llmm-{dead}-1700000000-{host}.0123abcd.tmp").write_text("half")
        for name, kind in names.items():
            if kind == "dir":
                (tmp_path / name).mkdir()
                (tmp_path / name / "model.safetensors").write_text("half")
            else:
                (tmp_path / name).write_text("x")
        done = sweep(tmp_path)
    finally:
        live.kill()
        live.wait()
    gone = {Path(d["path"]).name: d["action"] for d in done}
    assert gone == {f".merged_model.llmm-{dead}-1700000000-{host}.0123abcd.tmp": "removed",
                    f".report.json.llmm-{dead}-1700000000-{host}.0123abcd.tmp": "removed",
                    f".b.llmm-{live.pid}-{int(start) - 1000}-{host}.0123abcd.tmp": "removed",
                    f".x.jsonl.llmm-{dead}-1700000000-{host}.0123abcd.tmp": "removed",
                    f".recipe.yml.llmm-{dead}-1700000000-{host}.old": "restored"}
    assert (tmp_path / "recipe.yml").read_text() == "x"
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {n for n in names if n not in gone} | {"predictions", "recipe.yml"}


def test_temporaries_carry_the_marker(tmp_path):
    with atomic_path(tmp_path / "file.txt") as tmp:
        assert tmp.name.startswith(f".file.txt.{process_marker()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("x")
    assert (tmp_path / "file.txt").read_text() == "x" and _hidden(tmp_path) == []


def test_a_run_removes_stale_temporaries_and_says_so(tmp_path):
    run_dir = tmp_path / "out" / "ties_merge"
    run_dir.mkdir(parents=True)
    stale = run_dir / f".merged_model.llmm-{_dead_pid()}-1700000000-{host_name()}.0123abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(["-m", "ties_merge", "--tiny", "--no-eval", "--save", "none", "--quiet",
                 "--output_folder", str(tmp_path / "out")]) == 0
    removed = _report(run_dir)["outputs"]["removed_temporaries"]
    assert [r["path"] for r in removed] == [str(stale)] and not stale.exists()


# ------------------------------------------------------------------------------------------- what is current
def test_the_manifest_tells_this_runs_outputs_from_earlier_ones(tmp_path, monkeypatch):
    from llm_merging.model import engine

    args = ["-m", "ties_merge", *BASE, "--models", *FULL, "--no-eval", "--quiet", "--output_folder", str(tmp_path)]
    run_dir = tmp_path / "ties_merge"
    assert main(args) == 0
    first = _report(run_dir)["outputs"]
    assert {"recipe.yml", "merged_model/model.safetensors", "report.html"} <= set(first["written"])
    assert first["not_produced"] == [] and first["earlier"] == []
    for name, entry in first["written"].items():
        data = (run_dir / name).read_bytes()
        if name != "report.html":  # rewritten by the next run
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def failing(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "_merge_chunked", failing)
    assert main(args) == 1
    second = _report(run_dir)
    assert second["status"] == "error"
    out = second["outputs"]
    assert out["not_produced"] == ["recipe.yml", "merged_model/"]  # what this failed run did not write
    assert "merged_model/model.safetensors" in out["earlier"] and "recipe.yml" in out["earlier"]
    assert "report.html" in out["written"] and "recipe.yml" not in out["written"]
    every = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert every == set(out["written"]) | set(out["earlier"]) | {"report.json"}  # each file is one or the other
