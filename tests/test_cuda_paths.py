"""The device paths on a GPU, against the CPU: engine merges (bit for bit where docs/methods.md promises the same
model on any device), batched evaluation, a search trial, data-aware methods, the analysis, and two GPU processes
against one. Skipped without CUDA; ``pytest -m cuda`` and ``benchmarks/device_check.py`` run them.

The engine does its math on the GPU whenever there is one, even for a model loaded on the CPU
(``engine.compute_device``), so the CPU side of each comparison runs with ``torch.cuda.is_available`` patched
to False."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, merged_method, write_lines

from llm_merging.data import load_examples
from llm_merging.evaluation import evaluate_dataset, unique_names
from llm_merging.merging.factory import MethodOptions, configure, instantiate
from llm_merging.model import tiny
from llm_merging.pipeline import RunConfig, Runner

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MAIN = os.path.join(REPO_ROOT, "llm_merging", "main.py")
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "A summary is", "Question: which one?",
           "According to the above context, choose the best option to answer the following question."]


def _full(n=2):
    return [tiny.full_expert_dir("decoder", i) for i in range(n)]


def _lora(n=2):
    return [tiny.lora_expert_dir("decoder", i) for i in range(n)]


def _method(name, experts, device, values=None, seed=3, dtype="float32"):
    m = instantiate(name)
    configure(m, MethodOptions(base_model=str(tiny.base_dir("decoder")), models=[str(e) for e in experts],
                               device=device, dtype=dtype, seed=seed, progress=False, overrides=dict(values or {})))
    m.preflight()
    return m


def _merged(name, experts, device, values=None):
    """The merged parameters (CPU copies) and the engine's statistics."""
    m = _method(name, experts, device, values)
    m.merge()
    return {n: p.detach().cpu() for n, p in m.base_model.named_parameters()}, m.merge_stats


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _bits(t):
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


# ------------------------------------------------------------------------------------------------ merges
@pytest.mark.parametrize("name, values", [
    ("ties_merge", {"density": "0.4"}),
    ("ties_merge", {"density": "0.4", "weighted_sign": "true", "divisor": "weight_sum", "weights": "0.7,0.3"}),
    ("dare_ties", {"density": "0.4"}),
    ("dare_linear", {"density": "0.6"}),
    ("della", {"density": "0.6"}),
])
def test_engine_merge_of_full_experts_on_cuda_is_the_cpu_merge_bit_for_bit(name, values, monkeypatch):
    """Full fine-tunes: exact task vectors, exact TIES thresholds and counter-hash masks with 1/p a true
    division on both devices, so the same bits (docs/methods.md: the same seed gives the same model on any
    device)."""
    gpu, stats = _merged(name, _full(), "cuda", values)
    assert stats["math_device"].startswith("cuda")
    _no_gpu(monkeypatch)
    cpu, cpu_stats = _merged(name, _full(), "cpu", values)
    assert cpu_stats["math_device"] == "cpu"
    assert gpu.keys() == cpu.keys() and cpu
    for n in cpu:
        assert torch.equal(_bits(gpu[n]), _bits(cpu[n])), n


def test_engine_merge_of_lora_experts_on_cuda_matches_the_cpu(monkeypatch):
    """LoRA experts: ΔW = s·B·A is a matmul each device's BLAS rounds its own way, so close, not the same bits."""
    gpu, stats = _merged("task_arithmetic", _lora(), "cuda")
    assert stats["math_device"].startswith("cuda")
    _no_gpu(monkeypatch)
    cpu, _ = _merged("task_arithmetic", _lora(), "cpu")
    for n in cpu:
        torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fp16_merge_on_cuda_keeps_the_checkpoint_dtype():
    """A GPU run keeps an fp16 checkpoint in fp16 (``--dtype auto``) and merges into it in place."""
    m = _method("ties_merge", _full(), "cuda", {"density": "0.5"}, dtype="float16")
    m.merge()
    params = list(m.base_model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float16 for p in params)
    assert all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------------------------- evaluation
def _run(tmp_path, out, batch_size, dtype="float32"):
    cfg = RunConfig(method="ties_merge", tiny=True, device="cuda", dtype=dtype, batch_size=batch_size, save="none",
                    output_folder=str(tmp_path / out), progress=False, max_examples=6)
    runner = Runner(cfg)
    assert runner.run() == 0, runner.report.get("error")
    return runner.report, tmp_path / out / "ties_merge"


def _predictions(folder):
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((folder / "predictions").glob("*.jsonl"))}


def test_evaluation_on_cuda_batch_auto_gives_the_predictions_of_batch_one(tmp_path):
    auto, auto_dir = _run(tmp_path, "auto", "auto")
    _, one_dir = _run(tmp_path, "one", 1)
    assert auto["merge_stats"]["math_device"].startswith("cuda")
    sizes = {d["name"]: d["batch_size"] for d in auto["evaluation"]["datasets"]}
    assert any(s > 1 for s in sizes.values()), sizes  # the auto size from free GPU memory, not 1
    a, b = _predictions(auto_dir), _predictions(one_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name]):
            assert x["prediction"] == y["prediction"], (name, x.get("input", "")[:40])
            if "answer_choices_scores" in x:
                np.testing.assert_allclose(x["answer_choices_scores"], y["answer_choices_scores"], rtol=1e-4, atol=1e-4)


def test_run_on_cuda_with_auto_dtype_evaluates_in_half_precision(tmp_path):
    report, folder = _run(tmp_path, "half", "auto", dtype=None)
    assert report["merge_stats"]["math_device"].startswith("cuda")
    assert _predictions(folder) and report["evaluation"]["datasets"]


def test_evaluate_dataset_on_cuda_batch_auto_equals_batch_one():
    m = _method("task_arithmetic", _lora(), "cuda")
    m.merge()
    rows = [r for f in tiny.sample_data_files()[:2] for r in load_examples(f)]
    fast, _, used = evaluate_dataset(m, rows, batch_size=None, progress=False)
    slow, _, _ = evaluate_dataset(m, rows, batch_size=1, progress=False)
    assert used > 1 and fast.keys() == slow.keys() == set(range(len(rows)))
    for i in fast:
        assert fast[i]["prediction"] == slow[i]["prediction"], i


# ------------------------------------------------------------------------------------------------ search
def test_search_trial_on_cuda_is_the_engine_merge_and_scores_alike():
    from llm_merging.search.candidates import Fitness, InMemoryMerger

    values = {"density": "0.4"}
    loader = _method("dare_ties", _lora(), "cuda", values)
    merger = InMemoryMerger(loader, progress=False)
    assert merger.device.type == "cuda"
    theta0 = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
    cand = _method("dare_ties", _lora(), "cuda", values)
    merger.share_with(cand)
    cand.check_all_tensors(merger.names)
    merger.apply(cand.merge_resolved)
    got = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
    files = tiny.sample_data_files()[:2]
    rows = [[r for r in load_examples(f) if "label" in r or r.get("target")] for f in files]
    fitness = Fitness(unique_names(files), rows, [len(r) for r in rows])
    scores = fitness.evaluate(cand)
    merger.restore()
    for n, p in merger.model.named_parameters():
        assert torch.equal(p.detach(), theta0[n]), n
    merger.release()

    ref = _method("dare_ties", _lora(), "cuda", values)
    ref.merge()
    for n, p in ref.base_model.named_parameters():
        assert torch.equal(got[n], p.detach()), n  # the values the engine writes, bit for bit
    assert fitness.evaluate(ref)["scores"] == scores["scores"]


def test_search_run_on_cuda(tmp_path):
    from llm_merging.search import SearchConfig

    cfg = RunConfig(method="task_arithmetic", tiny=True, device="cuda", output_folder=str(tmp_path / "out"),
                    max_examples=2, progress=False, save="none", time_budget=300.0,
                    search=SearchConfig(examples=2, trials=2, prune=False))
    runner = Runner(cfg)
    assert runner.run() == 0, runner.report.get("error")
    assert runner.report["search"]["trials"]["complete"] == 2


# ------------------------------------------------------------------------------------ data-aware methods
@pytest.mark.parametrize("name", ["regmean", "fisher"])
def test_data_aware_merge_on_cuda_matches_the_cpu(name, tmp_path, monkeypatch):
    prompts = write_lines(tmp_path / "p.txt", PROMPTS)
    gpu = merged_method(name, [str(d) for d in _lora()], prompts, device="cuda", dtype="float32", progress=False)
    assert gpu.merge_stats["math_device"].startswith("cuda")
    got = {n: p.detach().cpu() for n, p in gpu.base_model.named_parameters()}
    del gpu
    _no_gpu(monkeypatch)
    cpu = merged_method(name, [str(d) for d in _lora()], prompts, device="cpu", dtype="float32", progress=False)
    for n, p in cpu.base_model.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-3, atol=2e-4, msg=n)


def test_adamerging_on_cuda_learns_finite_lambdas():
    rows = tiny.calibration_files()[0]  # rows with answer choices
    m = merged_method("adamerging", [str(d) for d in _lora()], rows, {"steps": 2}, device="cuda", dtype="float32",
                      progress=False)
    rep = m.calibration_report()["adamerging"]
    assert len(rep["entropy_per_step"]) == 3
    assert np.isfinite(np.array(list(rep["lambdas"].values()), dtype=float)).all()
    assert all(torch.isfinite(p).all() and p.device.type == "cuda" for p in m.base_model.parameters())


# ---------------------------------------------------------------------------------------------- analysis
def _flat(value):
    return np.array([np.nan if v is None else v for v in np.ravel(np.array(value, dtype=object))], dtype=float)


def test_analysis_on_cuda_matches_the_cpu():
    from llm_merging.insight.analysis import analyze_method
    from llm_merging.merging.base import TaskVectorMerge

    m = TaskVectorMerge("analyze")
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.is_peft = [str(_lora(1)[0]), str(_full(1)[0])], None
    m.preflight()
    gpu = analyze_method(m, device="cuda", progress=False)
    cpu = analyze_method(m, device="cpu", progress=False)
    assert gpu["math_device"].startswith("cuda") and cpu["math_device"] == "cpu"
    assert gpu["tensors_analyzed"] == cpu["tensors_analyzed"] > 0
    for key in ("norm", "cosine"):
        np.testing.assert_allclose(_flat(gpu["overall"][key]), _flat(cpu["overall"][key]), rtol=1e-4, equal_nan=True)


# ------------------------------------------------------------------------------------------ several GPUs
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_processes_write_what_one_writes(tmp_path):
    for i in range(2):  # built before the processes race for them
        tiny.lora_expert_dir("decoder", i)
    args = ["-m", "ties_merge", "--tiny", "--device", "cuda", "--dtype", "float32", "--batch-size", "2", "--save", "none",
            "--quiet", "-d", *tiny.sample_data_files(), "--max-examples", "5"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    one = subprocess.run([sys.executable, MAIN, *args, "--output_folder", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env=env, check=False)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", MAIN, *args,
                          "--output_folder", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    d1, d2 = tmp_path / "one" / "ties_merge", tmp_path / "two" / "ties_merge"
    files = sorted(p.relative_to(d1) for p in d1.rglob("*") if p.is_file() and
                   (p.suffix in (".jsonl", ".csv")))
    assert any(str(f).startswith("predictions") for f in files)
    for f in files:
        assert (d1 / f).read_bytes() == (d2 / f).read_bytes(), f
    report = json.loads((d2 / "report.json").read_text())
    assert report["num_processes"] == 2 and report["processes"]["merge"] == "identical"
