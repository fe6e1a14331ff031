"""Search vs defaults on a benchmark of interfering LoRA experts, each trained on its own task.

Three yes/no tasks share one prompt shape ("Is <word> an animal?", "... a color?", "... a number?"), so
the experts pull the same answer tokens in different directions. Each expert is a rank-8 LoRA of the tiny
decoder, trained for ``--steps`` on its task alone; every task has a dev file (the search's held-out
data) and a test file (the final evaluation). The script runs, each as the CLI command it prints:

* every method in ``--defaults`` with its default hyperparameters, evaluated on the test files;
* ``--search`` over ``--methods`` on the dev files (``--normalize``), the best evaluated on the test files;

and reports normalised test scores (mean over tasks of accuracy / the expert's own accuracy on its task)
and wall-clock seconds.

    python benchmarks/search_benchmark.py --time-budget 300
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_merging.model import tiny  # noqa: E402

WORDS = {
    "animal": ["cat", "dog", "horse", "cow", "sheep", "lion", "tiger", "mouse", "bird", "fish", "goat", "wolf",
               "bear", "duck", "frog", "snake", "rabbit", "deer", "fox", "owl"],
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "orange", "grey",
              "gold", "silver", "violet", "cyan", "amber", "ivory", "navy", "olive", "teal"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
               "twenty", "thirty", "forty", "fifty", "hundred", "thousand", "million", "zero"],
}
QUESTION = {"animal": "Is {w} an animal?", "color": "Is {w} a color?", "number": "Is {w} a number?"}
OTHER = ["table", "river", "house", "music", "paper", "stone", "cloud", "bread", "chair", "road", "window",
         "garden", "letter", "money", "summer", "winter", "city", "phone", "book", "lamp"]


def rows(task: str, n: int, seed: int) -> list[dict]:
    """Balanced yes/no rows of ``task``: half its category's words, half from the others and ``OTHER``."""
    rnd = random.Random(seed)
    negatives = [w for t, ws in WORDS.items() if t != task for w in ws] + OTHER
    out = []
    for i in range(n):
        yes = i % 2 == 0
        w = rnd.choice(WORDS[task] if yes else negatives)
        out.append({"input": QUESTION[task].format(w=w) + " Answer:", "answer_choices": ["yes", "no"],
                    "label": 0 if yes else 1})
    rnd.shuffle(out)
    return out


def write_jsonl(path: Path, data: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")


def train_expert(task: str, out: Path, steps: int, seed: int) -> float:
    """A rank-8 LoRA (every linear layer and the head) of the tiny base trained on ``task`` (answer tokens'
    log-likelihood); returns seconds."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    base = str(tiny.base_dir("decoder"))
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]))
    data = rows(task, 2000, seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        batch = data[(step * 32) % len(data):][:32]
        seqs, labels = [], []
        for r in batch:
            prompt = tok(r["input"])["input_ids"]
            answer = tok(r["answer_choices"][r["label"]], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.eos_token_id] * (width - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return time.time() - t0


def expert_dirs(work: Path, steps: int) -> list[str]:
    """One LoRA expert per task of WORDS under ``work`` (trained once, reused by later runs)."""
    out = []
    for i, task in enumerate(WORDS):
        path = work / f"expert-{task}"
        if not (path / "adapter_config.json").is_file():
            print(f"training the {task} expert ({steps} steps) ...", flush=True)
            print(f"  {train_expert(task, path, steps, seed=i):.1f} s", flush=True)
        out.append(str(path))
    return out


def cli(args: list[str], budget: float) -> tuple[dict, float, list[str]]:
    cmd = [sys.executable, str(REPO / "llm_merging" / "main.py"), *args, "-q", "--time-budget", str(budget)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    out = Path(args[args.index("--output_folder") + 1])
    reports = sorted(out.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text()), seconds, cmd


def accuracies(report: dict) -> dict[str, float]:
    return {d["name"]: d["scores"].get("accuracy", 0.0) for d in report["evaluation"]["datasets"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="/tmp/llm-merging-search-benchmark")
    p.add_argument("--steps", type=int, default=300, help="training steps per expert")
    p.add_argument("--dev", type=int, default=40, help="dev rows per task (the search data)")
    p.add_argument("--test", type=int, default=200, help="test rows per task")
    p.add_argument("--defaults", nargs="+", default=["linear", "task_arithmetic", "ties_merge", "dare_ties",
                                                     "magnitude_prune", "breadcrumbs_ties", "della"])
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties_merge", "dare_ties"])
    p.add_argument("--time-budget", type=float, default=300.0, help="budget of the search run (search + final)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    experts, dev, test = expert_dirs(work, args.steps), [], []
    for i, task in enumerate(WORDS):
        for split, n, seed, bucket in (("dev", args.dev, 100 + i, dev), ("test", args.test, 200 + i, test)):
            f = work / f"{task}_{split}.json"
            write_jsonl(f, rows(task, n, seed))
            bucket.append(str(f))
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
    for m in args.defaults:
        rep, sec, cmd = cli(["-m", m, *common, "--output_folder", str(work / "defaults")], 3600)
        acc = accuracies(rep)
        results.append((f"{m} (defaults)", normalised(acc), acc, sec))
    rep, sec, cmd = cli(["-m", *args.methods, *common, "--output_folder", str(work / "search"), "--search",
                         "--search-data", *dev, "--normalize"], args.time_budget)
    acc = accuracies(rep)
    s = rep["search"]
    results.append((f"search: {rep['method']} (best of {s['trials']['total']} trials)", normalised(acc), acc, sec))
    print(f"\nsearch command: {' '.join(cmd)}")
    print(f"search: {s['trials']} in {s['seconds']:.0f} s, stopped by {s['stopped_because']}; best dev value "
          f"{s['best']['value']:.3f}: {s['best']['method']} {json.dumps(s['best']['params'])}")
    print(f"\n{'merge':<52} {'normalised test':>15}  {'seconds':>7}  accuracy per task")
    for name, norm, acc, sec in results:
        print(f"{name:<52} {norm:15.3f}  {sec:7.1f}  " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
