"""Data-parallel runs: two CPU processes (gloo) launched the way torchrun / accelerate launch do (the
environment variables WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT), against one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from llm_merging.core import processes as distributed
from llm_merging.model import tiny
from llm_merging.core.errors import ConfigError
from llm_merging.evaluation import plan_batches, plan_groups, row_lengths

from conftest import REPO_ROOT

TESTS = os.path.dirname(os.path.abspath(__file__))
MAIN = os.path.join(REPO_ROOT, "llm_merging", "main.py")


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """``n`` processes of ``main.py args``, as torchrun starts them; every one must end within ``timeout``."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, MAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(WORLD_SIZE=str(n), RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(n)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def run_one(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True, timeout=240, env=_env())


def _files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


COMMON = ["--tiny", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same run in one process and in two: the kit sample files (cut to 5 rows: 3 batches of 2 for
    the multiple-choice file), plus a file of one row (process 1 gets no share of it)."""
    tiny.base_dir("decoder")  # build the tiny models once, before the processes race for them
    out = tmp_path_factory.mktemp("dp")
    one_row = out / "one_row.json"
    with open(tiny.sample_data_files()[0]) as f:
        one_row.write_text(f.readline())  # kit JSON lines
    files = ["-d", *tiny.sample_data_files(), str(one_row), "--max-examples", "5"]
    single = run_one(["-m", "ties_merge", *COMMON, *files, "--output_folder", str(out / "one")])
    double = launch(2, ["-m", "ties_merge", *COMMON, *files, "--output_folder", str(out / "two")])
    return single, double, out / "one" / "ties_merge", out / "two" / "ties_merge"


def test_two_processes_write_what_one_writes(one_and_two):
    single, double, d1, d2 = one_and_two
    assert single.returncode == 0, single.stderr
    assert [p.returncode for p in double] == [0, 0], [p.stderr for p in double]
    assert "ties_merge: ok" in double[0].stdout and double[1].stdout == ""  # process 0 reports
    one, two = _files(d1), _files(d2)
    assert set(one) == set(two)
    same = [k for k in one if k.startswith(("predictions/", "merged_model/")) or k.endswith((".csv", ".jsonl", ".yml"))]
    assert {"scores.jsonl", "test_sample_submission.csv", "predictions/one_row.jsonl"} <= set(same)
    for k in same:
        assert one[k] == two[k], k


def test_two_process_report_records_the_processes_and_their_shares(one_and_two):
    _, _, d1, d2 = one_and_two
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (d1, d2))
    assert r1["num_processes"] == 1 and "processes" not in r1
    assert r2["num_processes"] == 2
    assert r2["processes"]["backend"] == "gloo" and r2["processes"]["devices"] == ["cpu", "cpu"]
    assert r2["processes"]["merge"] == "identical"
    assert r1["evaluation"]["datasets"] == [{**d, "seconds": d1["seconds"], "predictions_path": d1["predictions_path"],
                                             "submission_path": d1["submission_path"]}
                                            for d, d1 in zip(r2["evaluation"]["datasets"], r1["evaluation"]["datasets"])]
    shares = r2["processes"]["shares"]
    assert list(shares) == ["cosmos_qa_sample", "xsum_sample", "test_sample", "one_row"]
    for ds in r2["evaluation"]["datasets"]:
        got = shares[ds["name"]]
        assert [s["rank"] for s in got] == [0, 1]
        assert sum(s["examples"] for s in got) == ds["n_examples"] == ds["n_evaluated"]
    assert [(s["examples"], s["batches"]) for s in shares["cosmos_qa_sample"]] == [(3, 2), (2, 1)]
    assert [(s["examples"], s["batches"]) for s in shares["one_row"]] == [(1, 1), (0, 0)]
    assert r1["hyperparameters"] == r2["hyperparameters"] and r1["status"] == r2["status"] == "ok"


def test_budget_spent_on_one_process_stops_both(tmp_path, one_and_two):
    """Process 1's budget runs out after its first batch: both stop after the same step, exit 3, and the
    partial predictions are exactly the finished batches of the full run."""
    _, _, d1, _ = one_and_two
    procs = launch(2, ["-m", "dp_methods:BudgetOnRank1", *COMMON, "--output_folder", str(tmp_path)])
    assert [p.returncode for p in procs] == [3, 3], [p.stderr for p in procs]
    assert procs[0].stderr.strip().splitlines()[-1].startswith("error: time budget of 3600 s ran out during evaluation")
    assert "Traceback" not in procs[0].stderr + procs[1].stderr
    d = tmp_path / "BudgetOnRank1"
    report = json.loads((d / "report.json").read_text())
    assert report["status"] == "partial" and report["exit_status"] == 3 and report["partial"] is True
    cosmos, xsum = report["evaluation"]["datasets"][:2]
    assert cosmos["n_evaluated"] == 4 and cosmos["partial"]  # step 0: one batch of 2 on each process
    assert xsum["n_evaluated"] == 0 and xsum["partial"]
    got = (d / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()
    full = (d1 / "predictions" / "cosmos_qa_sample.jsonl").read_text().splitlines()
    linear_full = [json.loads(x)["input"] for x in full]
    assert len(got) == 4 and all(json.loads(x)["input"] in linear_full for x in got)
    line = json.loads((d / "scores.jsonl").read_text().splitlines()[-1])
    assert line["cosmos_qa_sample"]["partial"] and line["xsum_sample"] == {"partial": True}


def test_user_error_on_one_process_stops_both_with_its_message(tmp_path):
    procs = launch(2, ["-m", "dp_methods:UserErrorOnRank1", *COMMON, "--output_folder", str(tmp_path)])
    assert [p.returncode for p in procs] == [2, 2], [p.stderr for p in procs]
    assert procs[0].stderr.strip().splitlines()[-1] == "error: dp test: bad batch (on process 1 of 2)"
    assert "Traceback" not in procs[0].stderr + procs[1].stderr
    report = json.loads((tmp_path / "UserErrorOnRank1" / "report.json").read_text())
    assert report["status"] == "error" and report["exit_status"] == 2


def test_internal_error_in_one_process_merge_stops_both(tmp_path):
    procs = launch(2, ["-m", "dp_methods:InternalErrorInMergeOnRank1", *COMMON, "--output_folder", str(tmp_path)])
    assert [p.returncode for p in procs] == [1, 1], [p.stderr for p in procs]
    assert procs[0].stderr.strip().splitlines()[-1] == "error: internal error (on process 1 of 2): RuntimeError: boom"
    assert "Traceback" not in procs[0].stderr + procs[1].stderr
    d = tmp_path / "InternalErrorInMergeOnRank1"
    assert not (d / "merged_model").exists() and not (d / "predictions").exists()  # nothing saved or evaluated


# ------------------------------------------------------------------------------------ in one process

def test_plan_batches_cuts_each_group_in_order():
    rows = [{"input": "x" * n, "eval_type": t, **({"answer_choices": ["a", "b"]} if t == "multiple_choice" else {})}
            for n, t in [(5, "multiple_choice"), (9, "generation"), (2, "multiple_choice"), (7, "multiple_choice"),
                         (1, "generation")]]
    batches = plan_batches(None, rows, 2)
    groups = plan_groups(rows, row_lengths(rows))
    assert [(b.eval_type, b.rows) for b in batches] == [
        (t, order[p: p + 2]) for t, order in groups for p in range(0, len(order), 2)]
    assert sorted(i for b in batches for i in b.rows) == list(range(5))


def test_single_process_does_everything_locally():
    single = distributed.SINGLE
    assert single.exchange(7) == [7] and single.max(3) == 3 and single.together(lambda: 5) == 5
    with pytest.raises(ConfigError):
        single.agree(ConfigError("x"))
    assert distributed.launched() == (1, 0) or os.environ.get("WORLD_SIZE")
    assert distributed.same_weights(single, torch.nn.Linear(2, 2)) == "single"


def test_fingerprint_sees_one_bit():
    torch.manual_seed(0)
    a = torch.nn.Linear(64, 32).to(torch.float16)
    b = torch.nn.Linear(64, 32).to(torch.float16)
    b.load_state_dict(a.state_dict())
    assert distributed.fingerprint(a) == distributed.fingerprint(b)
    with torch.no_grad():
        w = b.weight.view(-1).view(torch.int16)
        w[100] ^= 1  # the lowest mantissa bit of one weight
    fa, fb = distributed.fingerprint(a), distributed.fingerprint(b)
    assert fa[0] != fb[0] and fa[1] == fb[1]


@pytest.mark.parametrize("flag", ["--search", "--baselines", "--analyze"])
def test_one_process_features_refused_under_several(tmp_path, flag):
    from llm_merging.pipeline import InsightConfig, RunConfig, Runner
    from llm_merging.search import SearchConfig

    search = SearchConfig(data=tiny.sample_data_files()[:1]) if flag == "--search" else None
    cfg = RunConfig(method="linear", tiny=True, output_folder=str(tmp_path), search=search,
                    insight=InsightConfig(baselines=flag == "--baselines", analyze=flag == "--analyze"))
    runner = Runner(cfg)
    runner.procs = distributed.Processes(world=2, rank=0)
    with pytest.raises(ConfigError, match=f"^{flag} runs in one process, not 2: start it with python llm_merging/main.py"):
        runner.preflight()
    assert not (tmp_path / "linear").exists()


def test_device_per_process():
    cpu = distributed.Processes(world=2, rank=1, device="cpu")
    gpu = distributed.Processes(world=2, rank=1, device="cuda:1")
    assert cpu.device_for(None) == cpu.device_for("auto") == cpu.device_for("cuda") == "cpu"
    assert gpu.device_for("auto") == gpu.device_for("cuda") == "cuda:1" and gpu.device_for("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda:0: with 2 processes"):
        gpu.device_for("cuda:0")
