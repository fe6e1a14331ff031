"""lm-evaluation-harness tasks on the merged model, in memory (``--lm-eval TASKS``).

The merged model is wrapped, as it is in memory, in lm-eval's Hugging Face model class
(``lm_eval.models.huggingface.HFLM(pretrained=<model>, tokenizer=<tokenizer>)``) and evaluated with
``lm_eval.simple_evaluate``: no save, no reload. A task is an lm-eval task, group or tag name
(``arc_easy``, ``mmlu``), or the path of a task YAML file; ``--lm-eval-include DIR`` adds directories
of task YAMLs to the names lm-eval knows (lm-eval's ``--include_path``). The built-in index is only
read when a name is not found in the given files and directories (reading it took 20-30 s here).

:func:`prepare` (preflight, before any weight is loaded) checks that lm-eval is installed, parses the
options and loads every task with its data, so an unknown task, a broken YAML or a data set that needs
the hub while ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set is a one-line error before the merge.
:func:`evaluate` runs each requested name under the run's budget (checked between tasks and before
every forward pass: a task cut short is marked partial, finished tasks are kept) and writes
``lm_eval/results.json`` (lm-eval's own results format, the dict ``simple_evaluate`` returns minus the
samples) and ``lm_eval/samples_<task>.jsonl`` (lm-eval's per-document records). Each name becomes one
:class:`~llm_merging.evaluation.DatasetResult` (``source="lm_eval"``) with lm-eval's metrics
(``acc``, ``acc_norm``, ``exact_match,strict-match``, ...; no stderr), so it lands in report.json and in
the run's ``scores.jsonl`` line beside the kit files.

Under ``accelerate launch`` (a torch.distributed process group of N processes) the documents are
sharded across processes by lm-eval itself; every process returns the same results and only rank 0
writes files. :class:`SearchFitness` scores the search's candidates on the same tasks (``--search-lm-eval``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llm_merging.core.errors import ConfigError, DataError, first_line
from llm_merging.core.io import atomic_write_text
from llm_merging.evaluation import DatasetResult, model_of
from llm_merging.model.scoring import model_device

logger = logging.getLogger(__name__)

REQUIREMENT = "lm-eval>=0.4.12,<0.5"  # keep in step with setup.py's "lm-eval" extra (0.4.11 and older: no
# TaskManager.load, or transformers 5 breaks them)
INSTALL_HINT = f"pip install -e \".[lm-eval]\" (or pip install \"{REQUIREMENT}\")"
DEFAULT_CPU_BATCH_SIZE = 16  # as the kit multiple-choice files on CPU (evaluation.CPU_BATCH_SIZE)


def _int(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(f"expected an integer of at least {minimum}")
        return value
    return parse


def _limit(text: str) -> int | float:
    """lm-eval's ``limit``: a number of documents per task (integer) or a fraction in (0, 1)."""
    value = float(text)
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise ValueError("expected a positive integer or a fraction between 0 and 1")


def _batch(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        if text != "auto":
            float(text[5:])
        return text
    return _int(1)(text)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


#: ``--lm-eval-args`` keys: how each value is parsed, and what it sets
ARGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "num_fewshot": (_int(0), "few-shot examples per prompt (default: each task's own, else 0)"),
    "limit": (_limit, "first N documents of each task, or a fraction (lm-eval: for testing)"),
    "batch_size": (_batch, "lm-eval's batch size: an integer, auto or auto:N (default: --batch-size; auto is 16 on CPU)"),
    "max_batch_size": (_int(1), "upper bound of batch_size=auto (default 64)"),
    "max_length": (_int(1), "longest input in tokens (default: the model's)"),
    "bootstrap_iters": (_int(0), "bootstrap iterations of stderr estimates (default 100000; 0: none)"),
    "seed": (_int(0), "seed of lm-eval's few-shot sampling and of its Python/NumPy/torch RNGs (default: lm-eval's)"),
    "apply_chat_template": (_bool, "wrap prompts in the tokenizer's chat template (default false)"),
    "fewshot_as_multiturn": (_bool, "with a chat template, few-shot examples as turns (default true)"),
    "system_instruction": (str, "a system instruction prepended to every prompt"),
    "log_samples": (_bool, "write lm_eval/samples_<task>.jsonl (default true)"),
}


@dataclass
class LMEvalConfig:
    """What ``--lm-eval``, ``--lm-eval-include`` and ``--lm-eval-args`` ask for (parsed, not checked
    against lm-eval: :func:`prepare` does that)."""

    tasks: list[str]
    include: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)


def parse_tasks(text: str) -> list[str]:
    """``"a,b,path/c.yaml"`` → names in order, duplicates dropped; ConfigError when empty."""
    names = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    if not names:
        raise ConfigError(f"--lm-eval {text!r}: expected a comma-separated list of lm-eval tasks or task YAML files")
    return names


def parse_args(text: str | None) -> dict[str, Any]:
    """``"num_fewshot=5,limit=100"`` → ``{"num_fewshot": 5, "limit": 100}`` (keys from :data:`ARGS`)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"--lm-eval-args {item.strip()!r}: expected KEY=VALUE (keys: {', '.join(ARGS)})")
        if key not in ARGS:
            raise ConfigError(f"--lm-eval-args: unknown key {key!r} (keys: {', '.join(ARGS)})")
        try:
            out[key] = ARGS[key][0](value)
        except ValueError as exc:
            raise ConfigError(f"--lm-eval-args {key}={value}: {exc}") from None
    return out


def require_lm_eval():
    """The ``lm_eval`` package, or a one-line ConfigError saying how to install it."""
    import importlib.metadata as md

    try:
        import lm_eval
    except ImportError as exc:
        raise ConfigError(f"--lm-eval needs lm-evaluation-harness, which is not installed ({first_line(exc)}): "
                          f"{INSTALL_HINT}") from None
    try:
        version = md.version("lm_eval")
    except md.PackageNotFoundError:
        version = getattr(lm_eval, "__version__", "0")
    if _version_tuple(version) < (0, 4, 12) or _version_tuple(version) >= (0, 5):
        raise ConfigError(f"--lm-eval needs {REQUIREMENT}, found lm-eval {version}: {INSTALL_HINT}")
    return lm_eval


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ------------------------------------------------------------------------------------------ preflight

@dataclass
class PreparedTasks:
    """Checked tasks: the task manager that resolves them and, per requested name, its leaf tasks."""

    config: LMEvalConfig
    manager: Any
    leaves: dict[str, list[str]]  # requested name -> leaf task names
    names: dict[str, str]  # requested name (a YAML path too) -> task/group name in lm-eval's results
    version: str = ""
    progress: bool = True  # progress bars while evaluating


def _offline() -> bool:
    """Whether ``datasets`` may not reach the hub (it honours both switches)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load(manager, spec: str) -> dict:
    """``{"tasks": {name: Task}, "groups": {name: Group}, ...}`` for one spec (builds its tasks, loading their data)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return manager.load([spec])


def _spec_name(spec: str, loaded: dict) -> str:
    """The name lm-eval reports for ``spec``: itself, or the task/group a YAML file defines."""
    tasks, groups = loaded["tasks"], loaded.get("groups", {})
    if spec in tasks or spec in groups:
        return spec
    children = {c for g in groups.values() for c in (getattr(g, "child_names", None) or [])}
    top = [g for g in groups if g not in children]
    if len(top) == 1:
        return top[0]
    if not groups and len(tasks) == 1:
        return next(iter(tasks))
    return spec


def _describe_failure(spec: str, exc: BaseException) -> str:
    message = first_line(exc)
    if not os.path.isfile(spec) and (isinstance(exc, KeyError) or "is not a registered" in message):
        return (f"--lm-eval: unknown task {spec!r} (not an lm-eval task, group or tag name nor a task YAML file; "
                "`lm-eval ls tasks` lists the names; local YAML directories go in --lm-eval-include)")
    if _offline() and (isinstance(exc, ConnectionError) or "offline" in message.lower()):
        return (f"--lm-eval task {spec!r}: its data set is not in the local cache and the hub is offline "
                f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): {message}")
    return f"--lm-eval task {spec!r}: cannot load it: {message}"


def prepare(cfg: LMEvalConfig, progress: bool = True) -> PreparedTasks:
    """Check lm-eval, the options and every task (loading its data) before the merge; one-line errors."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager
    import importlib.metadata as md

    for d in cfg.include:
        if not os.path.isdir(d):
            raise ConfigError(f"--lm-eval-include {d!r}: not a directory of task YAML files")
    for spec in cfg.tasks:
        if spec.endswith((".yaml", ".yml")) and not os.path.isfile(spec):
            raise ConfigError(f"--lm-eval: task file {spec!r} does not exist")
    include = [str(Path(d).resolve()) for d in cfg.include] or None
    with _quiet_lm_eval(), _no_progress(progress):
        local = TaskManager(include_path=include, include_defaults=False)
        needs_index = [s for s in cfg.tasks if not os.path.isfile(s) and s not in local.all_tasks]
        manager = TaskManager(include_path=include) if needs_index else local
        leaves: dict[str, list[str]] = {}
        names: dict[str, str] = {}
        owner: dict[str, str] = {}
        for spec in cfg.tasks:
            try:
                loaded = _load(manager, spec)
            except Exception as exc:  # lm-eval and datasets raise many kinds; every one is about this task
                if manager is local and not isinstance(exc, OSError):  # not its data: a YAML naming built-in tasks?
                    manager = TaskManager(include_path=include)
                    try:
                        loaded = _load(manager, spec)
                    except Exception as exc2:
                        raise DataError(_describe_failure(spec, exc2)) from None
                else:
                    raise DataError(_describe_failure(spec, exc)) from None
            leaves[spec] = sorted(loaded["tasks"])
            names[spec] = _spec_name(spec, loaded)
            for leaf in leaves[spec]:
                if leaf in owner:
                    raise ConfigError(f"--lm-eval: task {leaf!r} is in both {owner[leaf]!r} and {spec!r}")
                owner[leaf] = spec
            if not leaves[spec]:
                raise ConfigError(f"--lm-eval: {spec!r} has no tasks")
    try:
        version = md.version("lm_eval")
    except md.PackageNotFoundError:  # pragma: no cover
        version = "unknown"
    return PreparedTasks(config=cfg, manager=manager, leaves=leaves, names=names, version=version, progress=progress)


@contextlib.contextmanager
def _no_progress(progress: bool = True):
    """Without ``progress`` (``--quiet``, a library call): no lm-eval or datasets progress bars."""
    if progress:
        yield
        return
    import sys

    import datasets
    from tqdm import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patched = [(m, m.tqdm) for name, m in list(sys.modules.items())
               if name.startswith("lm_eval") and m is not None and getattr(m, "tqdm", None) is tqdm]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for m, _ in patched:
        m.tqdm = Silent
    try:
        yield
    finally:
        for m, real in patched:
            m.tqdm = real
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval's INFO chatter, and its warnings about being handed a model object (which is the point
    here), stay out of the run's log unless --debug."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    names = ["lm_eval", "lm-eval"]
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


# ----------------------------------------------------------------------------------------- evaluation

class _BudgetStop(Exception):
    """Raised from a forward pre-hook once the run's budget is spent (lm-eval has no stop hook)."""


def _model_and_tokenizer(method):
    model = model_of(method)
    if model is None:
        raise ConfigError(f"method '{method.name}': no merged model to evaluate with --lm-eval")
    if getattr(method, "architecture", "decoder") == "encoder_decoder":
        tok, backend = getattr(method, "tokenizer", None), "seq2seq"
    else:
        tok, backend = getattr(method, "input_tokenizer", None) or getattr(method, "tokenizer", None), "causal"
    if tok is None:
        raise ConfigError(f"method '{method.name}': --lm-eval needs the base model's tokenizer, and there is none")
    return model, copy.deepcopy(tok), backend  # lm-eval may set the pad token / padding side: a copy


def _batch_size_for(args: dict, batch_size, model) -> int | str:
    if "batch_size" in args:
        return args["batch_size"]
    if isinstance(batch_size, int) or (isinstance(batch_size, str) and batch_size.isdigit()):
        return int(batch_size)
    return "auto" if model_device(model).type == "cuda" else DEFAULT_CPU_BATCH_SIZE


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_lm(method, prepared: PreparedTasks, batch_size="auto"):
    """lm-eval's ``HFLM`` over the method's merged model in memory (no copy of the weights)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    model, tok, backend = _model_and_tokenizer(method)
    args = prepared.config.args
    kwargs: dict[str, Any] = {"backend": backend, "tokenizer": tok,
                              "batch_size": _batch_size_for(args, batch_size, model)}
    for key in ("max_batch_size", "max_length"):
        if key in args:
            kwargs[key] = args[key]
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, **kwargs)
    rank, world = _distributed()
    if world > 1:  # lm-eval shards documents and gathers results itself once told the rank
        from accelerate import Accelerator

        lm._rank, lm._world_size, lm.accelerator = rank, world, Accelerator()
    return lm


def _metric_scores(entry: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` → ``{"acc": ..}`` (filter kept unless none)."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[metric if filt == "none" else key] = float(value)
    return out


def _main_metric(name: str, scores: dict[str, float], results: dict) -> str | None:
    """The first metric the task lists whose higher values are better (what the run's average takes)."""
    better = results.get("higher_is_better", {}).get(name, {})
    for key in scores:
        if better.get(key.partition(",")[0], True):
            return key
    return None


def _entries(name: str, results: dict) -> list[str]:
    """Names to report for a requested name: itself when lm-eval gives it metrics, else its subtasks."""
    entry = results.get("results", {}).get(name)
    if entry is not None and _metric_scores(entry):
        return [name]
    subs = results.get("group_subtasks", {}).get(name)
    if subs:
        return [leaf for sub in subs for leaf in _entries(sub, results)]
    return [name] if entry is not None else []


def _n_docs(name: str, results: dict) -> tuple[int, int]:
    """(documents in the task, documents evaluated), summed over a group's tasks."""
    ns = results.get("n-samples", {})
    if name in ns:
        return int(ns[name].get("original", 0)), int(ns[name].get("effective", 0))
    total = done = 0
    for sub in results.get("group_subtasks", {}).get(name, []):
        a, b = _n_docs(sub, results)
        total, done = total + a, done + b
    return total, done


def _eval_types(leaves: list[str], results: dict) -> list[str]:
    kinds = {"multiple_choice": "multiple_choice", "generate_until": "generation"}
    configs = results.get("configs", {})
    return sorted({kinds.get(configs.get(t, {}).get("output_type"), str(configs.get(t, {}).get("output_type")))
                   for t in leaves if t in configs})


def _merge_results(into: dict, new: dict) -> None:
    """Fold one ``simple_evaluate`` result into the run's (per-task tables united; run info kept)."""
    for key, value in new.items():
        if key == "samples":
            continue
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "config":
            into[key].update(value)
        elif key not in into:
            into[key] = value


def _write_json(path: Path, obj: Any) -> None:
    from lm_eval.utils import handle_non_serializable

    atomic_write_text(path, json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


def _write_samples(path: Path, samples: list[dict]) -> None:
    from lm_eval.utils import handle_non_serializable

    lines = [json.dumps(s, default=handle_non_serializable, ensure_ascii=False) for s in samples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _simple_evaluate(lm, prepared: PreparedTasks, spec: str) -> dict | None:
    import lm_eval

    args = prepared.config.args
    kwargs: dict[str, Any] = {"log_samples": args.get("log_samples", True)}
    for key in ("num_fewshot", "limit", "bootstrap_iters", "apply_chat_template", "fewshot_as_multiturn",
                "system_instruction"):
        if key in args:
            kwargs[key] = args[key]
    if "seed" in args:
        s = args["seed"]
        kwargs.update(random_seed=s, numpy_random_seed=s, torch_random_seed=s, fewshot_random_seed=s)
    with warnings.catch_warnings(), _env_info_once():
        warnings.simplefilter("ignore", DeprecationWarning)
        return lm_eval.simple_evaluate(model=lm, tasks=[spec], task_manager=prepared.manager, **kwargs)


_ENV_INFO: dict[str, Any] = {}


@contextlib.contextmanager
def _env_info_once():
    """``simple_evaluate`` records the environment (torch's collect_env: ``pip list`` and other
    subprocesses, ~2 s) in every result; it is the same for every task of a process: collect it once."""
    from lm_eval import evaluator

    real = getattr(evaluator, "add_env_info", None)
    if real is None:  # another lm-eval layout: leave it alone
        yield
        return

    def once(storage: dict) -> None:
        if not _ENV_INFO:
            fresh: dict[str, Any] = {}
            real(fresh)
            _ENV_INFO.update(fresh)
        storage.update(copy.deepcopy(_ENV_INFO))

    evaluator.add_env_info = once
    try:
        yield
    finally:
        evaluator.add_env_info = real


@dataclass
class TaskRun:
    """What :func:`run_tasks` got: lm-eval's results of the finished names, merged, and how it ended."""

    results: dict = field(default_factory=dict)  # lm-eval's format, without samples
    samples: dict[str, list] = field(default_factory=dict)  # leaf task -> lm-eval's per-document records
    seconds: dict[str, float] = field(default_factory=dict)  # each finished requested name
    stopped_at: str | None = None  # the name the budget cut short (it and the rest did not run)
    error: str | None = None  # one line: the name that failed and why (the rest did not run)


def run_tasks(lm, prepared: PreparedTasks, budget=None) -> TaskRun:
    """Run every requested name in turn with ``lm_eval.simple_evaluate``. A spent ``budget``
    (``remaining() <= 0``) stops before the next name or the next forward pass."""
    import torch

    world = _distributed()[1]

    def spent() -> bool:
        return budget is not None and budget.remaining() <= 0

    def hook(module, inputs):
        if spent():
            raise _BudgetStop()

    run = TaskRun()
    model = lm.model
    # One process: the budget is also checked before every forward pass. Several: between tasks only,
    # agreed by all (a process leaving lm-eval's collectives alone would hang the others).
    handle = model.register_forward_pre_hook(hook) if world == 1 and isinstance(model, torch.nn.Module) else None
    try:
        for spec in prepared.config.tasks:
            if _agreed(spent()):
                run.stopped_at = spec
                break
            t0 = time.perf_counter()
            try:
                with _quiet_lm_eval(), _no_progress(prepared.progress):
                    res = _simple_evaluate(lm, prepared, spec)
            except _BudgetStop:
                logger.warning("time budget spent: lm-eval task %s stopped", spec)
                run.stopped_at = spec
                break
            except Exception as exc:  # a task that fails on this model (a missing extra, a bad template...)
                logger.debug("lm-eval task %s failed", spec, exc_info=True)
                run.error = f"--lm-eval task {spec!r} failed: {type(exc).__name__}: {first_line(exc)}"
                if world > 1:  # the other processes may be inside lm-eval's collectives: agreeing would hang
                    _abort(run.error)
                break
            res = _share(res)
            _merge_results(run.results, res)
            run.samples.update(res.get("samples") or {})
            run.seconds[spec] = time.perf_counter() - t0
    finally:
        if handle is not None:
            handle.remove()
    return run


def _abort(message: str) -> None:
    """End this process at once with the one-line error (several processes: the launcher stops the others,
    which may be waiting in one of lm-eval's collectives; outputs already written are kept)."""
    import sys

    rank, world = _distributed()
    sys.stderr.write(f"error: {message} (on process {rank} of {world}; the run was stopped)\n")
    sys.stderr.flush()
    os._exit(1)


def _agreed(flag: bool) -> bool:
    """``flag`` on any process (every process gets the same answer)."""
    if _distributed()[1] == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _share(res: dict | None) -> dict:
    """Rank 0's results on every process (lm-eval returns them on rank 0 only)."""
    rank, world = _distributed()
    if world == 1:
        return res or {}
    import torch.distributed as dist

    box = [res if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0] or {}


def results_as_datasets(prepared: PreparedTasks, run: TaskRun, out_dir: Path | None = None,
                        taken: set[str] | None = None, batch_size: int | None = None) -> list:
    """A :class:`~llm_merging.evaluation.DatasetResult` per reported name (see :func:`evaluate`)."""
    results, taken = run.results, set(taken or ())
    write_samples = prepared.config.args.get("log_samples", True)
    datasets = []
    for spec in prepared.config.tasks:
        finished = spec in run.seconds
        names = [prepared.names[spec]]
        if finished:  # a tag has no entry of its own: its tasks
            names = _entries(names[0], results) or [t for t in prepared.leaves[spec] if t in results.get("results", {})]
        for name in names:
            label = f"lm_eval_{name}" if name in taken else name
            taken.add(label)
            d = DatasetResult(name=label, path=f"lm_eval:{spec}", eval_types=[], n_examples=0, partial=not finished,
                              batch_size=batch_size, source="lm_eval")
            if finished:
                d.scores = _metric_scores(results.get("results", {}).get(name, {}))
                d.main_metric = _main_metric(name, d.scores, results)
                d.n_examples, d.n_evaluated = _n_docs(name, results)
                d.n_scored = d.n_evaluated
                d.eval_types = _eval_types(sorted(_all_leaves(name, results)), results)
                d.seconds = run.seconds[spec] / len(names)
                if out_dir is not None and write_samples and name in run.samples:
                    d.predictions_path = str(out_dir / f"samples_{name}.jsonl")
            datasets.append(d)
    return datasets


def evaluate(method, prepared: PreparedTasks, out_dir: str | os.PathLike, *, batch_size="auto",
             budget=None, taken: set[str] | None = None) -> tuple[list, dict]:
    """Evaluate the method's merged model on the prepared tasks; write ``out_dir/lm_eval/`` (rank 0).

    Returns ``(a DatasetResult per reported name, the report section)``. ``taken``: names the kit files
    use (an lm-eval name equal to one is reported as ``lm_eval_<name>``). A name the budget cut short,
    and those after it, are marked partial, without scores.
    """
    t0 = time.perf_counter()
    out = Path(out_dir) / "lm_eval"
    lm = build_lm(method, prepared, batch_size)
    run = run_tasks(lm, prepared, budget)
    datasets = results_as_datasets(prepared, run, out, taken, _used_batch_size(lm))
    if _distributed()[0] == 0 and run.results:
        _write_json(out / "results.json", run.results)
        if prepared.config.args.get("log_samples", True):
            for task, rows in run.samples.items():  # document order (several processes gather them by rank)
                _write_samples(out / f"samples_{task}.jsonl", sorted(rows, key=lambda r: r.get("doc_id", 0)))
    section = {"tasks": list(prepared.config.tasks), "include": list(prepared.config.include),
               "args": dict(prepared.config.args), "version": prepared.version,
               "results_path": str(out / "results.json") if run.results else None,
               "seconds": round(time.perf_counter() - t0, 3), "finished": list(run.seconds)}
    if run.stopped_at is not None:
        section["stopped_at"] = run.stopped_at
    if run.error is not None:
        section["error"] = run.error
    return datasets, section


class _Deadline:
    def __init__(self, remaining: Callable[[], float]) -> None:
        self.remaining = remaining


class SearchFitness:
    """The search's objective on lm-eval tasks (``--search-lm-eval``), with the interface of
    :class:`llm_merging.search.candidates.Fitness`: the mean over the requested names of each one's main
    metric. No pruning (lm-eval scores a task at once); nothing is written."""

    def __init__(self, prepared: PreparedTasks, batch_size="auto") -> None:
        self.prepared = prepared
        self.batch_size = batch_size
        self.names: list[str] = list(prepared.names.values())
        self.seconds_per_example: dict[str, float] = {}  # by eval type: the search keeps time for the final run
        self._lm = None

    def evaluate(self, method, remaining: Callable[[], float] | None = None, report=None) -> dict[str, Any]:
        model = method.base_model
        if self._lm is None or self._lm.model is not model:
            self._lm = build_lm(method, self.prepared, self.batch_size)  # once: candidates are merged in place
        t0 = time.perf_counter()
        run = run_tasks(self._lm, self.prepared, _Deadline(remaining) if remaining is not None else None)
        if run.error is not None:
            raise DataError(run.error)
        datasets = results_as_datasets(self.prepared, run)
        docs = sum(d.n_evaluated for d in datasets)
        if docs and run.stopped_at is None:
            per = (time.perf_counter() - t0) / docs
            for kind in {k for d in datasets for k in d.eval_types}:
                old = self.seconds_per_example.get(kind)
                self.seconds_per_example[kind] = per if old is None else 0.7 * old + 0.3 * per
        primary = {d.name: d.primary() for d in datasets}
        values = [v for v in primary.values() if v is not None]
        return {"value": sum(values) / len(values) if values else float("nan"),
                "scores": {d.name: dict(d.scores) for d in datasets}, "primary": primary, "pruned": False,
                "partial": run.stopped_at is not None}


def _all_leaves(name: str, results: dict) -> set[str]:
    subs = results.get("group_subtasks", {}).get(name)
    if not subs:
        return {name}
    return {leaf for sub in subs for leaf in _all_leaves(sub, results)}


def _used_batch_size(lm) -> int | None:
    size = getattr(lm, "batch_size_per_gpu", None)
    return size if isinstance(size, int) else None
