"""benchmarks/device_check.py: its CPU form end to end (``--device cpu --shape tiny``, so that the GPU check
cannot rot between GPU slots), the one line without a GPU, the budget, and its helpers."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "device_check.py")
STEPS = ["cuda_tests", "models", "merges", "cpu_equality", "evaluation", "search", "processes"]


def _run(*args, hide_gpu=True, timeout=300):
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if hide_gpu else {})}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO_ROOT, check=False)


@pytest.fixture(scope="module")
def cpu_form(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device-check")
    out = tmp / "dc.json"
    proc = _run("--device", "cpu", "--shape", "tiny", "--out", str(out), "--processes", "2", "--work-dir", str(tmp),
                "--quiet")
    return proc, out, tmp


def test_cpu_form_exits_zero_prints_its_table_and_cleans_up(cpu_form):
    proc, out, tmp = cpu_form
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("device check: cpu") for line in lines)
    assert any(line.startswith("step ") for line in lines) and any(line.startswith("cosmos_qa") for line in lines)
    assert lines[-1] == f"results: {out}"
    assert not [p for p in tmp.iterdir() if p.name.startswith("device-check-")]  # the temporary folder is gone


def test_cpu_form_json_has_every_section_with_sane_values(cpu_form):
    _, out, _ = cpu_form
    doc = json.loads(out.read_text())
    assert doc["status"] == "ok" and doc["shape"] == "tiny" and doc["device"]["requested"] == "cpu"
    assert list(doc["steps"]) == STEPS and 0 < doc["seconds"] < doc["budget_s"]
    s = doc["steps"]
    assert s["cuda_tests"]["status"] == "skipped" and "GPU" in s["cuda_tests"]["reason"]
    assert s["processes"]["status"] == "skipped" and s["processes"]["reason"] == "needs 2 GPUs (0 here)"

    models = s["models"]
    assert models["status"] == "ok" and models["vocab"] == 1024 and models["layers"] == 4
    assert models["parameters"] > 0 and models["written_gib"] > 0 and models["peak_host_mib"] > 0
    assert models["lora"]["rank"] == 16 and models["subset"]["tensors"] == 2 * 9 + 3

    merges = s["merges"]["results"]
    assert s["merges"]["status"] == "ok" and len(merges) == 4
    for label, r in merges.items():
        assert r["seconds"] > 0 and r["merge_seconds"] >= 0 and r["peak_host_mib"] > 0, label
        assert r["math_device"] == "cpu" and r["tensors_merged"] > 0 and "peak_gpu_mib" not in r, label
    assert merges["ties_merge (full + LoRA)"]["tensors_merged"] == 4 * 9 + 3  # every tensor: the full expert
    assert merges["task_arithmetic (2 LoRA)"]["tensors_merged"] == 4 * 2  # q_proj, v_proj of every layer

    equal = s["cpu_equality"]
    assert equal["status"] == "ok" and set(merges) < set(equal["results"]) and len(equal["results"]) == 6
    for label, r in equal["results"].items():  # the CPU against the CPU: the same bits
        assert r["identical"] and r["verdict"] == "bit-identical" and r["max_abs_diff"] == 0.0, label
        assert r["tensors"] > 0 and r["values"] > 0 and r["cpu"]["math_device"] == "cpu", label
    assert equal["results"]["dare_ties (2 full, subset)"]["expected"].startswith("bit-identical")
    assert equal["results"]["dare_ties (2 LoRA)"]["tensors"] == 2 * 2  # the subset's 2 layers

    ev = s["evaluation"]
    assert ev["status"] == "ok" and set(ev["datasets"]) == {"cosmos_qa", "xsum"}
    for name, r in ev["datasets"].items():
        assert r["rows"] > 0 and r["identical"] and r["same_predictions"] == f"{r['rows']}/{r['rows']}", name
        assert r["auto"]["examples_per_s"] > 0 and r["batch_1"]["examples_per_s"] > 0 and r["speedup"] > 0, name
        assert r["auto"]["batch_size"] > 1 and r["batch_1"]["batch_size"] == 1, name
        assert r["full_validation"]["rows"] >= r["rows"] and r["full_validation"]["projected_s"] > 0, name
    assert ev["datasets"]["cosmos_qa"]["eval_type"] == "multiple_choice"
    assert ev["datasets"]["xsum"]["generated_ids_same"] == f"{ev['datasets']['xsum']['rows']}/{ev['datasets']['xsum']['rows']}"
    assert ev["projected_full_validation_s"] > 0

    search = s["search"]
    assert search["status"] == "ok" and search["same_scores"] is True and search["speedup"] > 0
    assert search["in_memory"]["trial"]["total"] > 0 and search["in_memory"]["setup_s"] >= 0
    trip = search["disk_round_trip"]
    assert all(trip[k] > 0 for k in ("merge", "save", "reload", "score", "total"))
    assert search["in_memory"]["scores"] == trip["scores"] and len(trip["scores"]) == 2  # the two files


def test_no_gpu_without_the_cpu_form_is_one_line_and_exit_zero(tmp_path):
    for args in ([], ["--shape", "tiny"], ["--device", "cpu"]):
        proc = _run(*args, "--out", str(tmp_path / "dc.json"))
        assert proc.returncode == 0, proc.stderr
        assert len(proc.stdout.strip().splitlines()) == 1 and "no GPU" in proc.stdout, args
        assert not (tmp_path / "dc.json").exists()


def test_spent_budget_skips_the_remaining_steps(tmp_path):
    out = tmp_path / "dc.json"
    proc = _run("--device", "cpu", "--shape", "tiny", "--budget", "0.01", "--out", str(out), "--work-dir",
                str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["status"] == "partial" and list(doc["steps"]) == STEPS
    assert all(step["status"] == "skipped" for step in doc["steps"].values())
    assert all(doc["steps"][k]["reason"].startswith("budget spent") for k in STEPS[1:])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("device-check-")]


def test_bad_option_is_one_line(tmp_path):
    proc = _run("--device", "cpu", "--shape", "tiny", "--eval-rows", "0", "--out", str(tmp_path / "dc.json"))
    assert proc.returncode == 2 and "--eval-rows must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytest_summary_counts(device_check):
    assert device_check.pytest_counts("..s\n3 passed, 1 skipped, 700 deselected in 9.12s\n") == {
        "passed": 3, "skipped": 1, "deselected": 700}
    assert device_check.pytest_counts("FAILED tests/x.py::t - boom\n==== 2 failed, 1 error in 3.0s ====") == {
        "failed": 2, "errors": 1}
    assert device_check.pytest_counts("") == {}


def test_compare_sees_one_bit(device_check):
    a = torch.zeros(4, dtype=torch.float16)
    b = a.clone()
    assert device_check.compare({"w": a}, {"w": b})["identical"]
    b[1] = -0.0  # equal values, other bits
    r = device_check.compare({"w": a}, {"w": b})
    assert not r["identical"] and r["max_abs_diff"] == 0.0 and r["differ_fraction"] == 0.25
    assert "error" in device_check.compare({"w": a}, {"v": b})


def test_subset_is_the_first_layers_and_everything_outside_them(device_check):
    assert device_check.in_subset("model.embed_tokens.weight") and device_check.in_subset("lm_head.weight")
    assert device_check.in_subset("model.layers.1.mlp.up_proj.weight")
    assert not device_check.in_subset(f"model.layers.{device_check.SUBSET_LAYERS}.mlp.up_proj.weight")
