"""``llm-merging -m METHOD [options]`` (``python llm_merging/main.py``): parse the flags into one
`RunConfig`, run the pipeline, print the summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llm_merging.cli import Parser, add_output_flags, guarded, setup_logging
from llm_merging.core.budget import Budget
from llm_merging.core.errors import ConfigError, LLMMergingError
from llm_merging.core.processes import launched
from llm_merging.lm_eval_tasks import LMEvalConfig, parse_args, parse_tasks
from llm_merging.merging import all_merge_handlers
from llm_merging.merging.hparams import parse_overrides
from llm_merging.model.scoring import SCORINGS
from llm_merging.pipeline import SAVE_MODES, CalibrationConfig, InsightConfig, RunConfig, Runner, SearchConfig


def build_parser() -> Parser:
    p = Parser(
        prog="llm-merging",
        description="Merge expert LLMs (LoRA adapters or full fine-tunes) into one model, then evaluate it.",
    )
    p.add_argument("-m", "--merging_method", "--method", dest="method", nargs="+",
                   help="registered merge method (see --list); several only with --search (the search picks one)")
    p.add_argument("--list", action="store_true", help="list the registered merge methods and exit")
    p.add_argument("--recipe", help="a mergekit-style YAML recipe (method, models, per-layer/per-module values); "
                                    "output, evaluation, device and budget flags still apply")
    p.add_argument("-d", "--dataset_filepaths", nargs="+", default=None,
                   help="evaluation files: starter-kit JSON lines or CSV (default: data/validation/{cosmos_qa,xsum}.csv)")
    p.add_argument("--eval_types", nargs="+", default=None, choices=("multiple_choice", "generation"),
                   help="eval type per dataset file (default: from each row)")
    p.add_argument("--output_folder", default="output", help="outputs go to OUTPUT_FOLDER/METHOD/ (default: output)")
    p.add_argument("--base-model", dest="base_model", help="base model: local directory or hub id[@revision]")
    p.add_argument("--models", nargs="+", help="expert models/adapters: local directories or hub ids[@revision]")
    p.add_argument("--set", dest="overrides", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="hyperparameters, e.g. --set density=0.3 weights=0.7,0.3")
    p.add_argument("--time-budget", dest="time_budget", type=float, default=3600.0,
                   help="wall-clock seconds for the whole run, from process start (default 3600)")
    p.add_argument("-b", "--batch-size", "--eval_batch_size", dest="batch_size", default="auto",
                   help="evaluation batch size, or 'auto' (default)")
    p.add_argument("--device", help="auto (default: the GPU when there is one, spread over all GPUs when there are "
                                    "several), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="model dtype (default auto)")
    p.add_argument("--max-examples", dest="max_examples", type=int, help="evaluate only the first N examples of each file")
    p.add_argument("--calibration-data", dest="calibration_data", nargs="+", metavar="FILE",
                   help="unlabeled prompts for data-aware methods (regmean, regmean_plus, fisher, adamerging): kit JSON "
                        "lines / CSV ('input', and 'answer_choices' for adamerging; never labels) or .txt lines; I=FILE gives expert I its own prompts")
    p.add_argument("--calibration-examples", dest="calibration_examples", type=int, metavar="N",
                   help="at most N calibration prompts per expert (default 256)")
    p.add_argument("--seed", type=int, default=None, help="seed of random merge methods (DARE, DELLA; default: the recipe's, else 0)")
    p.add_argument("--analyze", action="store_true",
                   help="task-vector analysis of the experts (norms, cosines, sign conflicts, ...): analysis.json, plots")
    p.add_argument("--baselines", action="store_true",
                   help="also evaluate the base and each expert alone; report normalised scores")
    p.add_argument("--save", default="full", choices=SAVE_MODES,
                   help="merged model output: HF directory (full), the kit's safetensor.pt (kit), "
                        "a PEFT adapter by SVD (adapter, LoRA inputs), or none")
    p.add_argument("--mc-scoring", dest="mc_scoring", choices=SCORINGS,
                   help="multiple-choice scoring: exact log p(choice|prompt) (default), or the starter kit's, which "
                        "skips the first answer token (alias: --set mc_scoring=...)")
    p.add_argument("--adapter-rank", dest="adapter_rank", type=int,
                   help="rank of --save adapter (default: the sum of the input ranks, exact for linear merges; "
                        "alias: --set adapter_rank=...)")
    p.add_argument("--tiny", action="store_true", help="offline smoke run with tiny twin models and sample data")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="merge and save only")
    e = p.add_argument_group("lm-evaluation-harness tasks (pip install -e \".[lm-eval]\")")
    e.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS",
                   help="comma list of lm-eval tasks/groups/tags or task YAML files, run on the merged model in memory "
                        "after the -d files (without -d: instead of the default files)")
    e.add_argument("--lm-eval-include", dest="lm_eval_include", nargs="+", default=[], metavar="DIR",
                   help="directories of task YAML files whose names --lm-eval may use (lm-eval's --include_path)")
    e.add_argument("--lm-eval-args", dest="lm_eval_args", metavar="K=V,...",
                   help="num_fewshot, limit, batch_size, max_batch_size, max_length, bootstrap_iters, seed, "
                        "apply_chat_template, fewshot_as_multiturn, system_instruction, log_samples")
    s = p.add_argument_group("search (the best merge on held-out data, within the budget)")
    s.add_argument("--search", nargs="*", default=None, metavar="ENTRY",
                   help="search before merging; entries KEY=LOW:HIGH[:log], KEY=a|b|c, KEY[*]= (one per expert), "
                        "KEY[i]=, KEY@G= (a G-anchor gradient over depth), METHOD.KEY=; none: the default space")
    s.add_argument("--search-data", dest="search_data", nargs="+", help="held-out files with labels scoring each candidate")
    s.add_argument("--search-examples", dest="search_examples", type=int,
                   help="first N examples of each search file (of each --search-lm-eval task)")
    s.add_argument("--search-lm-eval", dest="search_lm_eval", metavar="TASKS",
                   help="score candidates on lm-eval tasks instead of --search-data (names or task YAML files; "
                        "--lm-eval-include and --lm-eval-args apply)")
    s.add_argument("--normalize", action="store_true", help="objective: score / the best single expert's score, per file")
    s.add_argument("--trials", type=int, help="at most N trials (default: until the budget)")
    s.add_argument("--search-sampler", dest="search_sampler", default="tpe", help="tpe (default), cmaes, grid or random")
    s.add_argument("--grid-points", dest="grid_points", type=int, default=3, help="values per range with the grid sampler")
    s.add_argument("--resume", action="store_true",
                   help="continue the search journalled in OUTPUT/METHOD/search/; without --search, continue a "
                        "killed --no-eval --save full merge from its last written tensor")
    s.add_argument("--search-storage", dest="search_storage",
                   help="an Optuna RDB URL or journal:PATH shared by several workers started with the same command")
    s.add_argument("--search-study", dest="search_study", help="study name in the storage (default: from the space)")
    s.add_argument("--no-prune", dest="prune", action="store_false", help="no early stopping of poor candidates")
    add_output_flags(p)
    return p


def list_methods() -> str:
    """``--list``: each registered method with its one-line description."""
    handlers = all_merge_handlers()
    width = max((len(n) for n in handlers), default=0)
    lines = []
    for name, cls in handlers.items():
        desc = cls.get_description() if hasattr(cls, "get_description") else (cls.__doc__ or "").strip().split("\n")[0]
        lines.append(f"{name:<{width}}  {desc}")
    return "\n".join(lines)


def batch_size(value: str) -> str | int:
    """``--batch-size``: a positive integer or ``auto``."""
    if str(value).lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return n


def config_from_args(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    """The run configuration the flags ask for (ConfigError, one line, for flags that do not fit together)."""
    if not args.method and not args.recipe:
        raise ConfigError("no merge method given: use -m METHOD (see --list) or --recipe FILE.yml")
    methods = list(args.method or [])
    search = None
    if args.search is not None:
        search = SearchConfig(
            entries=list(args.search), methods=methods, data=args.search_data, examples=args.search_examples,
            normalize=args.normalize, sampler=args.search_sampler, grid_points=args.grid_points,
            trials=args.trials, resume=args.resume, storage=args.search_storage, study_name=args.search_study,
            prune=args.prune)
    else:
        if len(methods) > 1:
            raise ConfigError(f"-m {' '.join(methods)}: several methods need --search (it picks the best)")
        used = [flag for flag, on in (("--search-data", args.search_data), ("--search-lm-eval", args.search_lm_eval),
                                      ("--trials", args.trials is not None),
                                      ("--search-storage", args.search_storage),
                                      ("--normalize", args.normalize)) if on]
        if used:
            raise ConfigError(f"{used[0]} needs --search")
    lm_eval = None
    if args.lm_eval is not None:
        lm_eval = LMEvalConfig(tasks=parse_tasks(args.lm_eval), include=list(args.lm_eval_include),
                               args=parse_args(args.lm_eval_args))
    if search is not None and args.search_lm_eval is not None:
        limit = {"limit": args.search_examples} if args.search_examples is not None else {}
        search.lm_eval = LMEvalConfig(tasks=parse_tasks(args.search_lm_eval), include=list(args.lm_eval_include),
                                      args={**parse_args(args.lm_eval_args), **limit})
    if args.lm_eval is None and args.search_lm_eval is None and (args.lm_eval_args is not None or args.lm_eval_include):
        raise ConfigError(f"{'--lm-eval-args' if args.lm_eval_args is not None else '--lm-eval-include'} needs --lm-eval")
    return RunConfig(
        method=methods[0] if methods else "", recipe=args.recipe, dataset_filepaths=args.dataset_filepaths,
        eval_types=args.eval_types, output_folder=args.output_folder, base_model=args.base_model, models=args.models,
        overrides=parse_overrides([item for group in args.overrides for item in group]),
        time_budget=args.time_budget, batch_size=batch_size(args.batch_size), device=args.device,
        dtype=args.dtype, max_examples=args.max_examples, seed=args.seed, tiny=args.tiny,
        evaluate=args.evaluate, save=args.save, mc_scoring=args.mc_scoring, adapter_rank=args.adapter_rank,
        progress=not args.quiet, argv=["llm-merging", *argv], search=search, lm_eval=lm_eval,
        calibration=CalibrationConfig(data=args.calibration_data, examples=args.calibration_examples),
        insight=InsightConfig(analyze=args.analyze, baselines=args.baselines),
        resume=args.resume and search is None,
    )


def summary(report: dict[str, Any], out_dir: Path) -> str:
    """The CLI's short human summary of a run's report: phases, budget, memory, scores, outputs."""
    r = report
    lines = [f"method {r['method']}: {r['status']} (exit {r['exit_status']})"]
    for name, sec in r.get("phases_seconds", {}).items():
        lines.append(f"  {name:<28} {sec:9.2f} s")
    b = r.get("budget", {})
    lines.append(f"  {'budget left':<28} {b.get('remaining', 0):9.2f} s of {b.get('seconds', 0):g}")
    if r.get("num_processes", 1) > 1:  # accelerate launch / torchrun
        procs = r.get("processes") or {}
        lines.append(f"  {'processes':<28} {r['num_processes']:9d} ({procs.get('backend')}; merged weights: "
                     f"{procs.get('merge') or 'not merged'})")
    best = (r.get("search") or {}).get("best")
    if best:  # --search
        lines.append(f"  {'search':<28} {r['search']['trials']['total']} trials, best #{best['number']} "
                     f"{best['value']:.4f} ({best['method']}): {best['recipe']}")
        if r["search"].get("optimistic"):
            lines.append("  note: the search data is also evaluated: these scores are optimistic")
    calib = r.get("calibration")
    if calib and "seconds" in calib:
        lines.append(f"  {'calibration':<28} {calib['seconds']:9.2f} s, {calib.get('forward_passes', 0)} forward passes"
                     f" over {max(calib.get('prompts_per_expert') or [0])} prompts")
    if calib and calib.get("optimistic"):
        lines.append("  note: the calibration data is also evaluated or searched: these scores are optimistic")
    lines.append(f"  {'peak RAM':<28} {r.get('peak_rss_mib', 0):9.1f} MiB" +
                 (f", peak GPU {r['peak_gpu_mib']:.1f} MiB" if "peak_gpu_mib" in r else ""))
    for ds in r.get("evaluation", {}).get("datasets", []):
        scores = ", ".join(f"{k}={v:.4f}" for k, v in (ds.get("scores") or {}).items() if isinstance(v, (int, float)))
        name = ds.get("name") or Path(ds.get("path", "?")).name
        lines.append(f"  {name:<28} {ds.get('n_evaluated', '?')}/{ds.get('n_examples', '?')} {scores}")
    if r.get("saved"):
        lines.append(f"  model saved ({r['saved']['format']}): {r['saved']['path']}")
    lines.append(f"  report: {out_dir / 'report.json'}")
    if (out_dir / "report.html").is_file():
        lines.append(f"          {out_dir / 'report.html'}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run one merge as the flags ask; the exit status (0 ok, 2 user error, 3 budget spent, 130 interrupted,
    143 stopped by SIGTERM, 1 internal error)."""
    args = build_parser().parse_args(argv)
    rank = launched()[1]  # several processes (accelerate launch): process 0 reports, the others only warn
    setup_logging(args.quiet, args.debug, rank)
    if args.list:
        print(list_methods())
        return 0
    configs: list[RunConfig] = []

    def configure() -> int:
        configs.append(config_from_args(args, argv))
        return 0

    status = guarded(configure, debug=args.debug, report=rank == 0)
    if status != 0:
        return status
    runner = Runner(configs[0], budget=Budget(configs[0].time_budget))  # counted from process start (competition rule)
    status = runner.run()
    if rank != 0:  # the same status everywhere; process 0 prints it
        return status
    if runner.preflight_ok:
        print(summary(runner.report, runner.context.out_dir))
    if status != 0:
        print(f"error: {runner.report.get('error')}", file=sys.stderr)
    return status
