"""Command line: ``python llm_merging/main.py -m METHOD [options]`` (also ``python -m llm_merging.main``
and the ``llm-merging`` console script). Parses flags, discovers the method, hands over to the runner."""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as a script from a source tree: import the package, not its folder
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path[0] = _root
    else:
        sys.path.insert(0, _root)

from llm_merging.core.errors import LLMMergingError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    p.add_argument("--save", default="full", choices=("full", "kit", "adapter", "none"),
                   help="merged model output: HF directory (full), the kit's safetensor.pt (kit), "
                        "a PEFT adapter by SVD (adapter, LoRA inputs), or none")
    from llm_merging.model.scoring import SCORINGS

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
    s.add_argument("--resume", action="store_true", help="continue the search journalled in OUTPUT/METHOD/search/")
    s.add_argument("--search-storage", dest="search_storage",
                   help="an Optuna RDB URL or journal:PATH shared by several workers started with the same command")
    s.add_argument("--search-study", dest="search_study", help="study name in the storage (default: from the space)")
    s.add_argument("--no-prune", dest="prune", action="store_false", help="no early stopping of poor candidates")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    return p


def list_methods() -> str:
    from llm_merging.merging import all_merge_handlers

    handlers = all_merge_handlers()
    width = max((len(n) for n in handlers), default=0)
    lines = []
    for name, cls in handlers.items():
        desc = cls.get_description() if hasattr(cls, "get_description") else (cls.__doc__ or "").strip().split("\n")[0]
        lines.append(f"{name:<{width}}  {desc}")
    return "\n".join(lines)


def _batch_size(value: str):
    if str(value).lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise LLMMergingError(f"--batch-size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise LLMMergingError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "analyze":  # `llm-merging analyze --base-model REF --models REF ...`
        from llm_merging.insight.analysis import cli_main

        return cli_main(argv[1:])
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    from llm_merging.core.processes import launched

    rank = launched()[1]  # several processes (accelerate launch): process 0 reports, the others only warn
    logging.basicConfig(level=level if rank == 0 else max(level, logging.WARNING),
                        format=("" if rank == 0 else f"[process {rank}] ") + "%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "absl", "lm_eval", "lm-eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet or not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if args.quiet:
            hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass

    from llm_merging.merging.hparams import parse_overrides
    from llm_merging.pipeline.runner import RunConfig, Runner

    try:
        if args.list:
            print(list_methods())
            return 0
        if not args.method and not args.recipe:
            raise LLMMergingError("no merge method given: use -m METHOD (see --list) or --recipe FILE.yml")
        methods = list(args.method or [])
        search = None
        if args.search is not None:
            from llm_merging.search import SearchConfig

            search = SearchConfig(
                entries=list(args.search), methods=methods, data=args.search_data, examples=args.search_examples,
                normalize=args.normalize, sampler=args.search_sampler, grid_points=args.grid_points,
                trials=args.trials, resume=args.resume, storage=args.search_storage, study_name=args.search_study,
                prune=args.prune)
        else:
            if len(methods) > 1:
                raise LLMMergingError(f"-m {' '.join(methods)}: several methods need --search (it picks the best)")
            used = [flag for flag, on in (("--search-data", args.search_data), ("--search-lm-eval", args.search_lm_eval),
                                          ("--trials", args.trials is not None),
                                          ("--resume", args.resume), ("--search-storage", args.search_storage),
                                          ("--normalize", args.normalize)) if on]
            if used:
                raise LLMMergingError(f"{used[0]} needs --search")
        lm_eval = None
        if args.lm_eval is not None:
            from llm_merging.lm_eval_tasks import LMEvalConfig, parse_args, parse_tasks

            lm_eval = LMEvalConfig(tasks=parse_tasks(args.lm_eval), include=list(args.lm_eval_include),
                                   args=parse_args(args.lm_eval_args))
        if search is not None and args.search_lm_eval is not None:
            from llm_merging.lm_eval_tasks import LMEvalConfig, parse_args, parse_tasks

            limit = {"limit": args.search_examples} if args.search_examples is not None else {}
            search.lm_eval = LMEvalConfig(tasks=parse_tasks(args.search_lm_eval), include=list(args.lm_eval_include),
                                          args={**parse_args(args.lm_eval_args), **limit})
        if args.lm_eval is None and args.search_lm_eval is None and (args.lm_eval_args is not None or args.lm_eval_include):
            raise LLMMergingError(f"{'--lm-eval-args' if args.lm_eval_args is not None else '--lm-eval-include'} needs --lm-eval")
        cfg = RunConfig(
            method=methods[0] if methods else "", recipe=args.recipe, dataset_filepaths=args.dataset_filepaths, eval_types=args.eval_types,
            output_folder=args.output_folder, base_model=args.base_model, models=args.models,
            overrides=parse_overrides([item for group in args.overrides for item in group]),
            time_budget=args.time_budget, batch_size=_batch_size(args.batch_size), device=args.device,
            dtype=args.dtype, max_examples=args.max_examples, seed=args.seed, tiny=args.tiny,
            evaluate=args.evaluate, save=args.save, mc_scoring=args.mc_scoring, adapter_rank=args.adapter_rank,
            progress=not args.quiet, argv=["llm-merging", *argv],
            search=search, calibration_data=args.calibration_data, calibration_examples=args.calibration_examples,
        )
    except LLMMergingError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    cfg.analyze, cfg.baselines = args.analyze, args.baselines
    cfg.lm_eval = lm_eval
    from llm_merging.core.budget import Budget

    runner = Runner(cfg, budget=Budget(cfg.time_budget))  # counted from process start (competition rule)
    status = runner.run()
    if rank != 0:  # the same status everywhere; process 0 prints it
        return status
    if runner.preflight_ok:
        print(runner.summary())
    if status != 0:
        print(f"error: {runner.report.get('error')}", file=sys.stderr)
    return status


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
