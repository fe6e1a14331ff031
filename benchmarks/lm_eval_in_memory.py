"""lm-eval on a merged model: in memory (``--lm-eval``) vs the save → reload → lm-eval round trip that
mergekit users run, in one run, same model, same task, same documents.

In memory: ``lm_eval_tasks.build_lm`` wraps the loaded model (no copy) and ``run_tasks`` runs the task.
Round trip: ``save_pretrained`` of model and tokenizer to a temporary directory, then lm-eval's own
``HFLM(pretrained=<that directory>)`` (it loads the weights) and ``simple_evaluate`` on the same task:
once in this process (a lower bound) and once in a fresh process through lm-eval's CLI
(``python -m lm_eval``), as one evaluates a saved merge. The script checks the accuracies agree.

    python benchmarks/lm_eval_in_memory.py                            # Llama 4x1024, vocab 32k, fp32, CPU
    python benchmarks/lm_eval_in_memory.py --hidden 2048 --layers 8 --dtype bfloat16 --limit 50
    python benchmarks/lm_eval_in_memory.py --device cuda --hidden 4096 --layers 32 --dtype float16

Task: the kit's CosmosQA rows (``../shared/data/starter_kit/cosmos_qa.json`` when present, else the
package's sample) as a local lm-eval multiple-choice task, first ``--limit`` documents. Random weights,
the tiny tokenizer (ids < its 1,280 tokens; the model's vocabulary is ``--vocab``).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_merging import lm_eval_tasks  # noqa: E402
from llm_merging.model import tiny

KIT = REPO.parent / "shared" / "data" / "starter_kit" / "cosmos_qa.json"
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: "{{{{answer_choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


class _Method:
    """What ``lm_eval_tasks`` reads from a merge method: the merged model and its tokenizer."""

    name = "bench"
    architecture = "decoder"

    def __init__(self, model, tokenizer) -> None:
        self.base_model = model
        self.input_tokenizer = tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=20, help="documents of the task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-cli", action="store_true", help="skip the fresh-process lm-eval CLI run")
    args = ap.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 128, 1),
                         num_key_value_heads=max(args.hidden // 512, 1), max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype=dtype, device=args.device).eval()
    params = sum(p.numel() for p in model.parameters())

    work = Path(tempfile.mkdtemp(prefix="lm-eval-bench-"))
    rows = KIT if KIT.is_file() else tiny.SAMPLE_DATA_DIR / "cosmos_qa_sample.json"
    yaml_path = work / "bench_mc.yaml"
    yaml_path.write_text(TASK.format(rows=rows))
    cfg = lm_eval_tasks.LMEvalConfig(tasks=[str(yaml_path)], args={"limit": args.limit, "batch_size": args.batch_size,
                                                                     "bootstrap_iters": 0})
    prepared = lm_eval_tasks.prepare(cfg, progress=False)

    # in memory (what --lm-eval does)
    t0 = time.perf_counter()
    lm = lm_eval_tasks.build_lm(_Method(model, tok), prepared)
    run = lm_eval_tasks.run_tasks(lm, prepared)
    in_memory = time.perf_counter() - t0
    acc_memory = run.results["results"]["bench_mc"]["acc,none"]
    t0 = time.perf_counter()
    run2 = lm_eval_tasks.run_tasks(lm, prepared)  # a second task run on the same wrapper (as the search does)
    again = time.perf_counter() - t0

    # save -> reload -> lm-eval, in this process
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    saved = work / "merged"
    t0 = time.perf_counter()
    model.save_pretrained(str(saved))
    tok.save_pretrained(str(saved))
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    with lm_eval_tasks._quiet_lm_eval():
        lm2 = HFLM(pretrained=str(saved), device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with lm_eval_tasks._quiet_lm_eval(), lm_eval_tasks._no_progress(False):
        res = lm_eval.simple_evaluate(model=lm2, tasks=[str(yaml_path)], task_manager=prepared.manager,
                                      limit=args.limit, bootstrap_iters=0, log_samples=False)
    t_eval = time.perf_counter() - t0
    acc_reload = res["results"]["bench_mc"]["acc,none"]
    del lm2

    t_cli, acc_cli = None, None
    if not args.no_cli:  # a fresh process, as one evaluates a saved merge with lm-eval's CLI
        out = work / "cli"
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
               f"pretrained={saved},dtype={args.dtype}", "--tasks", str(yaml_path), "--device", args.device,
               "--batch_size", str(args.batch_size), "--limit", str(args.limit), "--output_path", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        t_cli = time.perf_counter() - t0
        if proc.returncode != 0:  # older CLIs take the flags without the "run" subcommand
            cmd.remove("run")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            t_cli = time.perf_counter() - t0
        found = sorted(out.rglob("results_*.json"))
        if proc.returncode == 0 and found:
            acc_cli = json.loads(found[-1].read_text())["results"]["bench_mc"]["acc,none"]
        else:
            print("lm-eval CLI failed:", proc.stderr.strip().splitlines()[-1:] or proc.returncode)

    print(f"model: Llama {args.layers}x{args.hidden}, vocab {args.vocab}, {params / 1e6:.0f}M parameters, {args.dtype}, "
          f"{args.device}; task: {args.limit} CosmosQA documents ({rows.name}), batch {args.batch_size}")
    print(f"{'in memory (--lm-eval)':<40} {in_memory:8.2f} s   acc {acc_memory:.4f}")
    print(f"{'  again on the same wrapper (search)':<40} {again:8.2f} s   acc {run2.results['results']['bench_mc']['acc,none']:.4f}")
    total = t_save + t_load + t_eval
    print(f"{'save + reload + lm-eval, same process':<40} {total:8.2f} s   acc {acc_reload:.4f}   "
          f"(save {t_save:.2f}, load {t_load:.2f}, evaluate {t_eval:.2f}); {total / in_memory:.2f}x the in-memory time")
    if t_cli is not None:
        cli_total = t_save + t_cli
        acc_text = f"{acc_cli:.4f}" if acc_cli is not None else "n/a"
        print(f"{'save + lm-eval CLI in a fresh process':<40} {cli_total:8.2f} s   acc {acc_text}   "
              f"{cli_total / in_memory:.2f}x the in-memory time")
    same = acc_memory == acc_reload and (acc_cli is None or acc_cli == acc_memory)
    print("same accuracy on every side:", same)


if __name__ == "__main__":
    main()
