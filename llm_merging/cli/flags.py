"""The flags of ``llm-merging -m METHOD ...``: a parser built from torch-free modules only, so that ``--help``
and a mistyped flag answer at once, before the library is loaded."""
from __future__ import annotations

from llm_merging.cli import COMMANDS, Parser, add_output_flags
from llm_merging.core.choices import DATA_AWARE_METHODS, DTYPES, SAVE_MODES, SCORINGS
from llm_merging.data import EVAL_TYPES


def build_parser() -> Parser:
    p = Parser(
        prog="llm-merging",
        description="Merge expert LLMs (LoRA adapters or full fine-tunes) into one model, then evaluate it.",
        epilog=f"other commands: {', '.join(COMMANDS)} (llm-merging COMMAND --help)",
    )
    p.add_argument("-m", "--merging_method", "--method", dest="method", nargs="+",
                   help="registered merge method (see --list); several only with --search (the search picks one)")
    p.add_argument("--list", action="store_true", help="list the registered merge methods and exit")
    p.add_argument("--recipe", help="a mergekit-style YAML recipe (method, models, per-layer/per-module values); "
                                    "output, evaluation, device and budget flags still apply")
    p.add_argument("-d", "--dataset_filepaths", nargs="+", default=None,
                   help="evaluation files: starter-kit JSON lines or CSV (default: data/validation/{cosmos_qa,xsum}.csv)")
    p.add_argument("--eval_types", nargs="+", default=None, choices=EVAL_TYPES,
                   help="eval type per dataset file (default: from each row)")
    p.add_argument("--output_folder", default="output", help="outputs go to OUTPUT_FOLDER/METHOD/ (default: output)")
    p.add_argument("--base-model", dest="base_model",
                   help="base model: local directory or hub id[@revision]; without it, --models are merged without "
                        "a base (linear, karcher, nuslerp, multislerp, passthrough: the first model is the template)")
    p.add_argument("--models", nargs="+", help="expert models/adapters: local directories or hub ids[@revision]")
    p.add_argument("--set", dest="overrides", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="hyperparameters, e.g. --set density=0.3 weights=0.7,0.3")
    p.add_argument("--time-budget", dest="time_budget", type=float, default=3600.0,
                   help="wall-clock seconds for the whole run, from process start (default 3600)")
    p.add_argument("-b", "--batch-size", "--eval_batch_size", dest="batch_size", default="auto",
                   help="evaluation batch size, or 'auto' (default)")
    p.add_argument("--device", help="auto (default: the GPU when there is one, spread over all GPUs when there are "
                                    "several), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default auto)")
    p.add_argument("--max-examples", dest="max_examples", type=int, help="evaluate only the first N examples of each file")
    p.add_argument("--calibration-data", dest="calibration_data", nargs="+", metavar="FILE",
                   help=f"unlabeled prompts for data-aware methods ({', '.join(DATA_AWARE_METHODS)}): kit JSON "
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
                        "a PEFT adapter by SVD of the merged ΔW (adapter; LoRA or full experts), or none")
    p.add_argument("--mc-scoring", dest="mc_scoring", choices=SCORINGS,
                   help="multiple-choice scoring: exact log p(choice|prompt) (default), or the starter kit's, which "
                        "skips the first answer token (alias: --set mc_scoring=...)")
    p.add_argument("--adapter-rank", dest="adapter_rank", type=int,
                   help="rank of --save adapter (default, LoRA experts only: the sum of the input ranks, exact for "
                        "linear merges; full fine-tunes and DoRA need this or --adapter-energy; "
                        "alias: --set adapter_rank=...)")
    p.add_argument("--adapter-energy", dest="adapter_energy", type=float, metavar="E",
                   help="--save adapter: per module, the smallest rank keeping fraction E in (0, 1] of ΔW's squared "
                        "Frobenius norm (instead of --adapter-rank; alias: --set adapter_energy=...)")
    p.add_argument("--adapter-max-rank", dest="adapter_max_rank", type=int, metavar="N",
                   help="--save adapter: no module's rank above N (caps --adapter-energy and the default rank; "
                        "alias: --set adapter_max_rank=...)")
    p.add_argument("--save-intermediates", dest="save_intermediates", action="store_true",
                   help="a chained recipe (several merges, each with a name): also save each merge made before the "
                        "final one, as OUTPUT_FOLDER/METHOD/NAME/merged_model/")
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
