"""Data-aware merges (RegMean, RegMean++, Fisher, AdaMerging) vs task arithmetic and TIES at their defaults,
on the interfering tiny LoRA experts of ``search_benchmark.py``.

Three rank-8 LoRA experts of the tiny decoder, each trained on one yes/no task ("Is W an animal / a color /
a number?", the same prompt shape, so they pull the same answer tokens apart), are reused from
``search_benchmark.py``'s work directory (trained there when missing). Calibration data are unlabeled
inputs only (``calib_<task>.txt``, drawn apart from the test rows); the labelled test files score the
merge. Every data-aware method runs twice: with the three tasks' prompts shared by every expert
(``shared``), and with each expert given its own task's prompts (``--calibration-data I=FILE``, ``own``).
Printed: normalised test score (mean over tasks of accuracy / the expert's own accuracy), accuracy per
task, the run's seconds and the calibration seconds, each with the CLI command that produced it.

    python benchmarks/data_aware_quality.py
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from search_benchmark import WORDS, accuracies, cli, expert_dirs, rows, write_jsonl  # noqa: E402

from llm_merging.model import tiny  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/llm-merging-search-benchmark", help="shared with search_benchmark.py")
    p.add_argument("--steps", type=int, default=300, help="training steps per expert (when not trained yet)")
    p.add_argument("--calibration", type=int, default=64, help="unlabeled calibration prompts per task")
    p.add_argument("--test", type=int, default=200, help="test rows per task")
    p.add_argument("--baselines", nargs="+", default=["task_arithmetic", "ties_merge"])
    p.add_argument("--methods", nargs="+", default=["regmean", "regmean_plus", "fisher", "adamerging"])
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from llm_merging.merging import method_targets

    known = method_targets()
    missing = [m for m in args.methods if m not in known]
    methods = [m for m in args.methods if m in known]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    experts, test, calib = expert_dirs(work, args.steps), [], []
    for i, task in enumerate(WORDS):
        f = work / f"{task}_test.json"
        write_jsonl(f, rows(task, args.test, 200 + i))  # the same test rows as search_benchmark.py
        test.append(str(f))
        c = work / f"calib_{task}.txt"  # inputs only: no answer, no label
        c.write_text("".join(r["input"] + "\n" for r in rows(task, args.calibration, 300 + i)), encoding="utf-8")
        calib.append(str(c))
    base = ["--base-model", str(tiny.base_dir("decoder")), "--device", "cpu", "--save", "none"]
    common = [*base, "--models", *experts, "--dataset_filepaths", *test]

    own = {}
    for task, expert, f in zip(WORDS, experts, test):  # each expert alone on its own task
        rep, _, _ = cli(["-m", "linear", *base, "--models", expert, "--dataset_filepaths", f,
                         "--output_folder", str(work / f"own-{task}")], 3600)
        own[Path(f).stem] = accuracies(rep)[Path(f).stem]
    print("experts on their own task (test accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in own.items()))

    def normalised(acc: dict[str, float]) -> float:
        return sum(acc[k] / own[k] for k in own) / len(own)

    results = []
    for m in args.baselines:
        rep, sec, cmd = cli(["-m", m, *common, "--output_folder", str(work / "data-aware")], 3600)
        results.append((f"{m} (defaults)", rep, sec, cmd))
    modes = {"shared": calib, "own": [f"{i}={c}" for i, c in enumerate(calib)]}
    for m in methods:
        for mode, files in modes.items():
            rep, sec, cmd = cli(["-m", m, *common, "--output_folder", str(work / f"data-aware-{mode}"),
                                 "--calibration-data", *files], 3600)
            results.append((f"{m} ({mode} prompts)", rep, sec, cmd))
    print(f"\n{'merge':<34} {'normalised test':>15} {'seconds':>8} {'calib s':>8}  accuracy per task")
    for name, rep, sec, _ in results:
        acc = accuracies(rep)
        c = (rep.get("calibration") or {}).get("seconds")
        print(f"{name:<34} {normalised(acc):15.3f} {sec:8.1f} {c if c is not None else '-':>8}  "
              + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    if missing:
        print(f"(not registered here: {', '.join(missing)})")
    print("\ncommands:")
    for name, _, _, cmd in results:
        print(f"  {name}: {' '.join(cmd[1:])}")


if __name__ == "__main__":
    main()
