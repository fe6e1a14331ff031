"""Start-up cost of the package and the command line, optionally side by side with another source tree.

    python benchmarks/startup.py                                   # this tree
    python benchmarks/startup.py --baseline /path/to/other/checkout --repeat 5

Each figure is the fastest of ``--repeat`` fresh processes (wall seconds):
* ``import llm_merging``;
* ``python llm_merging/main.py --help``;
* the whole ``-m task_arithmetic --tiny --no-eval --save none`` run, and its preflight phase as report.json
  records it (the method built, models resolved, every phase checked; the imports before it not included),
  after one warm-up run that builds the tiny models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wall(cmd: list[str], tree: Path, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def measure(tree: Path, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree), "LLM_MERGING_TINY_CACHE": str(Path(tmp) / "tiny"),
               "HF_HUB_OFFLINE": "1"}
        run = [sys.executable, "llm_merging/main.py", "-m", "task_arithmetic", "--tiny", "--no-eval", "--save",
               "none", "--quiet", "--output_folder", str(Path(tmp) / "out")]
        wall(run, tree, env)  # builds the tiny models
        out = {"import": [], "help": [], "run": [], "preflight": []}
        for _ in range(repeat):
            out["import"].append(wall([sys.executable, "-c", "import llm_merging"], tree, env))
            out["help"].append(wall([sys.executable, "llm_merging/main.py", "--help"], tree, env))
            out["run"].append(wall(run, tree, env))
            report = json.loads((Path(tmp) / "out" / "task_arithmetic" / "report.json").read_text())
            out["preflight"].append(report["phases_seconds"]["preflight"])
        return {k: min(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, help="another source tree of llm_merging to compare with")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    trees = {"this tree": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results = {name: measure(tree, args.repeat) for name, tree in trees.items()}
    names = list(results)
    print(f"{'seconds (fastest of ' + str(args.repeat) + ')':<34}" + "".join(f"{n:>12}" for n in names))
    for key, label in (("import", "import llm_merging"), ("help", "main.py --help"),
                       ("run", "--tiny --no-eval run"), ("preflight", "  its preflight phase (report.json)")):
        print(f"{label:<34}" + "".join(f"{results[n][key]:>12.2f}" for n in names))


if __name__ == "__main__":
    main()
