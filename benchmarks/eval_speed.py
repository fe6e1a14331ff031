"""Evaluation speed: the batched engine vs the same code one example at a time, in one run.

Both sides use the same functions: prompts right-padded and run once (causal fast path, no mask),
each prompt's KV cache reused by its answer choices, logits only where a choice token is scored,
greedy decoding with finished sequences leaving the batch. The batched side groups and sorts by token
length and runs ``--batch-size`` examples per call (``auto``: the evaluator's CPU default); the
baseline runs batch size 1. Reported per dataset: examples/s of each, their ratio (best of
``--repeats`` interleaved runs, which tames load spikes on a shared machine) and the agreement of the
predictions (multiple-choice picks; generation: identical texts).

    python benchmarks/eval_speed.py --threads 2          # tiny decoder on 2 CPU cores, kit validation files
    python benchmarks/eval_speed.py --model PATH --device cuda --dtype bfloat16 --max-examples 500

Data: ``--data-dir`` (default ``../shared/data/starter_kit`` from the repository root) holding
``validation/cosmos_qa.csv`` and ``validation/xsum.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_merging.data import load_examples  # noqa: E402
from llm_merging.evaluation import CPU_BATCH_SIZE, auto_batch_size, evaluate_dataset, plan_groups  # noqa: E402
from llm_merging.model import decoder_functions  # noqa: E402

DATASETS = {"cosmos_qa": "validation/cosmos_qa.csv", "xsum": "validation/xsum.csv"}


class DecoderMethod:
    """Duck-typed merge method around a causal LM (what the evaluator needs of a Merges class)."""

    architecture = "decoder"

    def __init__(self, model_path: str, device: str, dtype: torch.dtype, max_gen_len: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = "eval_speed"
        self.device = device
        self.max_gen_len = max_gen_len
        self.mc_scoring = "exact"
        self.base_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.input_tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        if self.input_tokenizer.pad_token is None:
            self.input_tokenizer.pad_token = self.input_tokenizer.eos_token
        self.target_tokenizer = AutoTokenizer.from_pretrained(
            model_path, padding_side="right", add_bos_token=False, add_eos_token=True)
        if self.target_tokenizer.pad_token is None:
            self.target_tokenizer.pad_token = self.target_tokenizer.eos_token

    def get_name(self) -> str:
        return self.name

    def predict_multiple_choice(self, batch):
        return decoder_functions.predict_multiple_choice(
            self.base_model, self.input_tokenizer, self.target_tokenizer, batch, scoring=self.mc_scoring)

    def generate(self, batch):
        return decoder_functions.generate(
            self.base_model, self.input_tokenizer, self.target_tokenizer, batch, self.max_gen_len)


def _once(method, rows, batch_size) -> tuple[float, dict]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    preds, _partial, _ = evaluate_dataset(method, rows, batch_size=batch_size, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, preds


def _compare(method, rows, batch_size, repeats: int):
    """Best-of-``repeats`` seconds of the batched engine and of batch size 1, runs interleaved (so
    that a load spike on a shared machine hits both alike)."""
    fast = slow = float("inf")
    p_fast = p_slow = {}
    for _ in range(repeats):
        t, p_fast = _once(method, rows, batch_size)
        fast = min(fast, t)
        t, p_slow = _once(method, rows, 1)
        slow = min(slow, t)
    return fast, slow, p_fast, p_slow


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "starter_kit"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--max-examples", type=int, default=200)
    ap.add_argument("--model", default=None, help="causal LM directory (default: the tiny offline decoder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", default="auto", help="'auto' or an int (batched engine)")
    ap.add_argument("--max-gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 2)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N interleaved timings")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        from llm_merging import tiny

        model_path = str(tiny.base_dir("decoder"))
    method = DecoderMethod(model_path, args.device, getattr(torch, args.dtype), args.max_gen_len)
    data_dir = Path(args.data_dir)

    rows_out = []
    for name in args.datasets:
        path = data_dir / DATASETS[name]
        if not path.exists():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        rows = load_examples(path, max_examples=args.max_examples)
        if args.batch_size == "auto":
            etype, order = plan_groups(rows)[0]
            bs = auto_batch_size(method, etype, [rows[i] for i in order])
        else:
            bs = int(args.batch_size)
        evaluate_dataset(method, rows[: min(4, len(rows))], batch_size=bs, progress=False)  # warm-up
        t_batched, t_single, p_batched, p_single = _compare(method, rows, bs, args.repeats)
        same = sum(p_batched[i]["prediction"] == p_single[i]["prediction"] for i in p_batched)
        rows_out.append((name, len(rows), bs, len(rows) / t_batched, len(rows) / t_single,
                         t_single / t_batched, same / len(rows)))

    dev = args.device + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else "")
    print(f"\nmodel: {model_path}\ndevice: {dev}, dtype {args.dtype}, max_gen_len {args.max_gen_len}, "
          f"CPU auto batch sizes {CPU_BATCH_SIZE}")
    header = f"{'dataset':<10} {'examples':>8} {'batch':>5} {'batched ex/s':>13} {'one-at-a-time ex/s':>19} {'speedup':>8} {'agreement':>10}"
    print(header)
    print("-" * len(header))
    for name, n, bs, fast, slow, ratio, agree in rows_out:
        print(f"{name:<10} {n:>8} {bs:>5} {fast:>13.2f} {slow:>19.2f} {ratio:>7.2f}x {agree:>10.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
