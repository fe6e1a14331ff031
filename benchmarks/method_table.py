"""Every data-free method at its defaults: quality on interfering experts and merge time at a 32k-vocabulary
shape, next to task arithmetic and TIES.

Quality: the three interfering rank-8 LoRA experts of ``search_benchmark.py`` (yes/no tasks "Is W an animal /
a color / a number?", the same prompt shape; reused from its work directory, trained there when missing) and
its test rows (``--test`` per task). Score: normalised test score, the mean over tasks of accuracy / the
expert's own accuracy on its task. A method that takes one expert (``expo``) cannot merge the three: it is run
on each expert alone and scored on that expert's own task (its row says so).

Time: a random fp16 Llama base (vocabulary 32000, hidden 1024, ``--layers`` layers, intermediate 2816) and
three full fp16 fine-tunes of it, written by ``merge_memory.py``'s ``build`` (cached under ``--work-dir``);
each method merges them through the command line (``--no-eval --save none --dtype float16 --device cpu``,
one-expert methods the first expert only) in a fresh process: the merge phase's seconds (from
``report.json``), the whole command's wall seconds and its peak RSS.

The methods are ``METHODS`` below (a method not registered when the script runs is skipped with a note);
the baselines are ``BASELINES``. Every row prints the command that produced it.

    python benchmarks/method_table.py                      # both tables
    python benchmarks/method_table.py --skip-time --test 100
    python benchmarks/method_table.py --skip-quality --layers 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from merge_memory import build  # noqa: E402
from search_benchmark import WORDS, accuracies, expert_dirs, rows, write_jsonl  # noqa: E402

from llm_merging.merging import get_method_class, method_targets  # noqa: E402
from llm_merging.model import tiny  # noqa: E402

#: the newer data-free methods (skipped with a note when not registered)
METHODS = ["pcb_merging", "magmax", "consensus_ta", "consensus_ties", "expo", "lines", "cart", "star", "wudi"]
#: the baselines every table shows first (the time table: TIES)
BASELINES = ["task_arithmetic", "ties_merge"]
TIME_BASELINES = ["ties_merge"]
#: the time shape: vocabulary, hidden, intermediate (merge_memory.py's "large"); layers from --layers
VOCAB, HIDDEN, INTERMEDIATE = 32000, 1024, 2816
MAIN = HERE.parent / "llm_merging" / "main.py"


def run(args: list[str], out: Path, budget: float) -> tuple[dict | None, float, list[str], str]:
    """One command-line run in a fresh process: (report or None, wall seconds, command, error line)."""
    cmd = [sys.executable, str(MAIN), *args, "--output_folder", str(out), "-q", "--time-budget", str(budget)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    reports = sorted(out.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode not in (0, 3) or not reports:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return None, seconds, cmd, (lines[-1] if lines else f"exit {proc.returncode}")
    return json.loads(reports[-1].read_text()), seconds, cmd, ""


def one_expert(method: str) -> bool:
    low, high = get_method_class(method).expert_count
    return high == 1


def shown(cmd: list[str]) -> str:
    return " ".join(["python", "llm_merging/main.py", *cmd[2:]])


def quality(args, methods: list[str]) -> list[tuple[str, str, list[str]]]:
    """Rows (label, score text, command) of the quality table."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    experts, test = expert_dirs(work, args.steps), []
    for i, task in enumerate(WORDS):
        f = work / f"{task}_test.json"
        write_jsonl(f, rows(task, args.test, 200 + i))  # the same test rows as search_benchmark.py
        test.append(str(f))
    base = ["--base-model", str(tiny.base_dir("decoder")), "--device", "cpu", "--save", "none"]
    stems = [Path(f).stem for f in test]
    own = {}
    for expert, f, stem in zip(experts, test, stems):  # each expert alone on its own task
        rep, _, _, err = run(["-m", "linear", *base, "--models", expert, "--dataset_filepaths", f],
                             work / f"own-{stem}", 3600)
        if rep is None:
            raise SystemExit(f"the expert alone failed: {err}")
        own[stem] = accuracies(rep)[stem]
    print("experts on their own task (test accuracy): " + ", ".join(f"{k} {v:.3f}" for k, v in own.items()),
          flush=True)

    out = []
    for m in [*BASELINES, *methods]:
        if one_expert(m):  # each expert alone, scored on its own task
            scores, cmds = [], []
            for expert, f, stem in zip(experts, test, stems):
                rep, _, cmd, err = run(["-m", m, *base, "--models", expert, "--dataset_filepaths", f],
                                       work / f"table-{m}-{stem}", 3600)
                cmds.append(shown(cmd))
                if rep is None:
                    scores = None
                    out.append((f"`{m}` (one expert)", f"failed: {err}", cmds))
                    break
                scores.append(accuracies(rep)[stem] / own[stem])
            if scores is not None:
                per = ", ".join(f"{s:.3f}" for s in scores)
                out.append((f"`{m}` (1 expert: each alone, its own task)", f"{sum(scores) / len(scores):.3f} ({per})",
                            cmds))
        else:
            rep, _, cmd, err = run(["-m", m, *base, "--models", *experts, "--dataset_filepaths", *test],
                                   work / "table", 3600)
            if rep is None:
                out.append((f"`{m}`", f"failed: {err}", [shown(cmd)]))
            else:
                acc = accuracies(rep)
                score = sum(acc[k] / own[k] for k in own) / len(own)
                out.append((f"`{m}`", f"{score:.3f} (" + ", ".join(f"{acc[k]:.3f}" for k in stems) + ")",
                            [shown(cmd)]))
        print(f"  {out[-1][0]}: {out[-1][1]}", flush=True)
    return out


def timing(args, methods: list[str]) -> list[tuple[str, str, str, str, str]]:
    """Rows (method, merge s, wall s, peak RSS MiB, command) of the time table."""
    work = Path(args.work_dir) / f"time-v{VOCAB}-h{HIDDEN}-l{args.layers}"
    work.mkdir(parents=True, exist_ok=True)
    done = work / "done.json"
    if not done.is_file():
        print(f"writing the fp16 base and 3 full experts (vocabulary {VOCAB}, hidden {HIDDEN}, {args.layers} "
              "layers) ...", flush=True)
        size = build(work, 3, args.layers, HIDDEN, VOCAB, INTERMEDIATE)
        done.write_text(json.dumps({"size": size}))
    size = json.loads(done.read_text())["size"]
    print(f"model size S = {size / 2**20:.0f} MiB (fp16)", flush=True)
    experts = [str(work / f"expert{i}") for i in range(3)]
    out = []
    for m in [*TIME_BASELINES, *methods]:
        models = experts[:1] if one_expert(m) else experts
        rep, wall, cmd, err = run(["-m", m, "--base-model", str(work / "base"), "--models", *models, "--no-eval",
                                   "--save", "none", "--dtype", "float16", "--device", "cpu"],
                                  work / "runs", args.budget)
        label = f"`{m}`" + (" (1 expert)" if len(models) == 1 else "")
        if rep is None:
            out.append((label, f"failed: {err}", f"{wall:.1f}", "", shown(cmd)))
        else:
            merge = rep["phases_seconds"].get("merge")
            partial = " (budget spent)" if rep.get("partial") else ""
            out.append((label, f"{merge:.1f}{partial}", f"{wall:.1f}", f"{rep.get('peak_rss_mib', 0):.0f}", shown(cmd)))
        print(f"  {' | '.join(out[-1][:4])}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/llm-merging-search-benchmark", help="shared with search_benchmark.py")
    p.add_argument("--steps", type=int, default=300, help="training steps per expert (when not trained yet)")
    p.add_argument("--test", type=int, default=200, help="test rows per task")
    p.add_argument("--layers", type=int, default=12, help="layers of the time shape (merge_memory.py's large: 12)")
    p.add_argument("--budget", type=float, default=1800.0, help="time budget of each timed merge (seconds)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-time", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    known = method_targets()
    methods = [m for m in METHODS if m in known]
    missing = [m for m in METHODS if m not in known]
    if missing:
        print(f"not registered here, skipped: {', '.join(missing)}")
    started = time.strftime("%Y-%m-%d %H:%M")
    cpu = f"{os.cpu_count()} CPUs, torch {torch.__version__}, {subprocess.run(['uname', '-m'], capture_output=True, text=True).stdout.strip()}"
    print(f"started {started}; {cpu}", flush=True)
    q = [] if args.skip_quality else quality(args, methods)
    t = [] if args.skip_time else timing(args, methods)
    if q:
        print(f"\nquality: normalised test score ({args.test} test rows per task; accuracy per task in brackets)")
        print("| method | normalised test score |\n|---|---|")
        for label, score, _ in q:
            print(f"| {label} | {score} |")
    if t:
        print(f"\ntime: vocabulary {VOCAB}, hidden {HIDDEN}, {args.layers} layers, 3 full fp16 experts, CPU")
        print("| method | merge phase s | wall s | peak RSS MiB |\n|---|---|---|---|")
        for row in t:
            print("| " + " | ".join(row[:4]) + " |")
    if missing:
        print(f"\n(not registered here: {', '.join(missing)})")
    print("\ncommands:")
    for label, _, cmds in q:
        for c in cmds:
            print(f"  {label}: {c}")
    for row in t:
        print(f"  {row[0]}: {row[4]}")


if __name__ == "__main__":
    main()
