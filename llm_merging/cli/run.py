"""``llm-merging -m METHOD [options]`` (``python llm_merging/main.py``): parse the flags into one
`RunConfig`, run the pipeline, print the summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llm_merging.cli import guarded, setup_logging
from llm_merging.cli.flags import build_parser
from llm_merging.core.budget import Budget
from llm_merging.core.errors import ConfigError
from llm_merging.core.processes import launched
from llm_merging.lm_eval_tasks import LMEvalConfig, parse_args, parse_tasks
from llm_merging.merging import all_merge_handlers
from llm_merging.merging.hparams import parse_overrides
from llm_merging.pipeline import CalibrationConfig, InsightConfig, RunConfig, Runner, SearchConfig


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
        adapter_energy=args.adapter_energy, adapter_max_rank=args.adapter_max_rank,
        progress=not args.quiet, argv=["llm-merging", *argv], search=search, lm_eval=lm_eval,
        calibration=CalibrationConfig(data=args.calibration_data, examples=args.calibration_examples),
        insight=InsightConfig(analyze=args.analyze, baselines=args.baselines),
        resume=args.resume and search is None, save_intermediates=args.save_intermediates,
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
    chain = r.get("chain")
    if chain:  # a chained recipe: the merges made before the final one
        lines.append(f"  {'chain':<28} {len(chain['merges'])} merges before the final one "
                     f"({', '.join(m['name'] for m in chain['merges'])}), intermediates: {chain['intermediates']}")
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


def main(argv: list[str], args: argparse.Namespace | None = None) -> int:
    """Run one merge as the flags ask (``args``: ``argv`` already parsed); the exit status (0 ok, 2 user
    error, 3 budget spent, 130 interrupted, 143 stopped by SIGTERM, 1 internal error)."""
    args = build_parser().parse_args(argv) if args is None else args
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
