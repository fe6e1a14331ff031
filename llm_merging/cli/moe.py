"""``llm-merging moe CONFIG.yml OUT_DIR``: build a mixture-of-experts model out of dense experts from a
mergekit-moe YAML (see docs/moe.md); ``--eval`` then evaluates it like a merge run's evaluate phase."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llm_merging.cli import Parser, add_output_flags, guarded, setup_logging
from llm_merging.cli.run import batch_size
from llm_merging.core.budget import Budget
from llm_merging.core.devices import check_device
from llm_merging.core.errors import ConfigError
from llm_merging.core.io import check_new_dir
from llm_merging.data import EVAL_TYPES
from llm_merging.lm_eval_tasks import LMEvalConfig, parse_args, parse_tasks
from llm_merging.merging.Merges import Merges
from llm_merging.model.moe import (
    build_moe,
    check_output_dir,
    list_kinds,
    load_moe_config,
    parse_shard_size,
    plan_moe,
)
from llm_merging.pipeline.config import RunConfig
from llm_merging.pipeline.context import RunContext
from llm_merging.pipeline.phases.evaluate import EvaluatePhase


class BuiltModel(Merges):
    """A saved model evaluated as it is (no merge): the evaluation layer's view of the built MoE."""

    expert_count = (0, 0)

    def load(self) -> None:
        """Load the model and its tokenizers as a merge method holds them after merging."""
        self.architecture = "decoder"
        self._load_base_model()
        self._load_tokenizer()


def build_parser() -> Parser:
    p = Parser(prog="llm-merging moe",
               description="Build a mixture-of-experts model (Mixtral, Qwen2-MoE or Qwen3-MoE) out of dense expert "
                           "models or LoRA adapters, from a mergekit-moe YAML; routers from prompts (gate_mode).")
    p.add_argument("config", nargs="?", help="the mergekit-moe YAML (base_model, experts, gate_mode, ...)")
    p.add_argument("out_path", nargs="?", metavar="OUT_DIR",
                   help="the output model directory: new or empty (written whole or not at all)")
    p.add_argument("--list-architectures", dest="list_architectures", action="store_true",
                   help="list the output architectures and what they hold, and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of random gates and of noise_scale (default 0)")
    p.add_argument("--device", default="cpu",
                   help="where the prompts' hidden states are computed: cpu, cuda, cuda:N or auto (the GPU when "
                        "there is one); default cpu")
    p.add_argument("--allow-same-experts", dest="allow_same", action="store_true",
                   help="build even when every expert is the same model (only useful to train it afterwards)")
    p.add_argument("--max-shard-size", dest="max_shard_size", default="5GB",
                   help="safetensors shard size, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    e = p.add_argument_group("evaluation of the built model (as a merge run evaluates)")
    e.add_argument("--eval", dest="evaluate", action="store_true", help="evaluate the built model")
    e.add_argument("-d", "--dataset_filepaths", nargs="+", default=None,
                   help="evaluation files (default: the kit's data/validation/{cosmos_qa,xsum}.csv)")
    e.add_argument("--eval_types", nargs="+", default=None, choices=EVAL_TYPES, help="eval type per dataset file")
    e.add_argument("--output_folder", default="output", help="evaluation outputs go to OUTPUT_FOLDER/moe/ (default: output)")
    e.add_argument("-b", "--batch-size", dest="batch_size", default="auto", help="evaluation batch size, or 'auto'")
    e.add_argument("--max-examples", dest="max_examples", type=int, help="evaluate only the first N examples of each file")
    e.add_argument("--time-budget", dest="time_budget", type=float, default=3600.0,
                   help="wall-clock seconds for the evaluation (default 3600)")
    e.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS", help="comma list of lm-eval tasks run on the built model")
    e.add_argument("--lm-eval-include", dest="lm_eval_include", nargs="+", default=[], metavar="DIR",
                   help="directories of task YAML files (lm-eval's --include_path)")
    e.add_argument("--lm-eval-args", dest="lm_eval_args", metavar="K=V,...", help="lm-eval options, as for a merge run")
    add_output_flags(p)
    return p


def main(argv: Sequence[str]) -> int:
    """0 on success, 2 on a user error (one line), 1 on an internal error."""
    args = build_parser().parse_args(list(argv))
    setup_logging(args.quiet, args.debug)

    def work() -> int:
        if args.list_architectures:
            for line in list_kinds():
                print(line)
            return 0
        if not args.config or not args.out_path:
            raise ConfigError("give the YAML and the output directory: llm-merging moe CONFIG.yml OUT_DIR")
        evaluating = args.evaluate or args.dataset_filepaths or args.lm_eval
        if not args.evaluate and evaluating:
            raise ConfigError("-d/--lm-eval choose what --eval evaluates: add --eval")
        device = check_device(args.device or "cpu")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        shard_size = parse_shard_size(args.max_shard_size, "--max-shard-size")
        check_new_dir(args.out_path, "OUT_DIR")  # before any model is resolved (a hub model may be downloaded)
        cfg = load_moe_config(args.config)
        plan = plan_moe(cfg, seed=args.seed, device=device, allow_same_experts=args.allow_same)
        check_output_dir(plan, args.out_path, "OUT_DIR")  # and none of the inputs: before any weight is read
        phase = ctx = None
        if args.evaluate:  # the evaluation files and tasks are checked before the build
            lm_eval = None
            if args.lm_eval is not None:
                lm_eval = LMEvalConfig(tasks=parse_tasks(args.lm_eval), include=list(args.lm_eval_include),
                                       args=parse_args(args.lm_eval_args))
            batch = batch_size(args.batch_size)
            run = RunConfig(method="moe", dataset_filepaths=args.dataset_filepaths, eval_types=args.eval_types,
                            output_folder=args.output_folder, base_model=args.out_path, time_budget=args.time_budget,
                            batch_size=batch, max_examples=args.max_examples, device=device,
                            progress=not args.quiet, lm_eval=lm_eval, argv=["llm-merging", "moe", *argv])
            run.validate()
            ctx = RunContext(config=run, budget=Budget(run.time_budget, start=time.time()),
                             out_dir=Path(args.output_folder) / "moe")
            phase = EvaluatePhase()
            phase.check(ctx)
        summary = build_moe(plan, args.out_path, progress=not args.quiet, max_shard_size=shard_size)
        print(f"built {summary['architecture']} with {summary['experts']} experts "
              f"({summary['experts_per_token']} per token, {summary['shared_experts']} shared, gate_mode "
              f"{summary['gate_mode']}, {summary['dtype']}) in {summary['seconds']:.1f} s: {summary['output']}")
        if phase is not None and ctx is not None:
            method = BuiltModel("moe")
            method.base_model_name, method.device = args.out_path, device
            method.progress = not args.quiet
            method.load()
            ctx.method = method
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            evaluation = phase.run(ctx)
            for ds in (evaluation or {}).get("datasets", []):
                print(f"  {ds.get('name')}: {json.dumps(ds.get('scores', {}), default=str)}")
            print(f"  evaluation outputs: {ctx.out_dir}")
        return 0

    return guarded(work, debug=args.debug)

