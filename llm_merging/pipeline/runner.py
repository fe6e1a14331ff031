"""The pipeline under one wall-clock budget: preflight → merge (with load) → save → evaluate → report.

Exit statuses: 0 success, 2 a user error (one line on stderr), 3 the budget ran out (finished work is
kept and the report is marked partial), 130 interrupted (Ctrl-C, same), 1 an internal error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_merging.core import processes as distributed
from llm_merging.core.budget import Budget
from llm_merging.core.errors import BudgetExceeded, ConfigError, DataError, LLMMergingError
from llm_merging.data import check_max_examples
from llm_merging.core.devices import check_device
from llm_merging.core.io import atomic_write_json, check_output_folder, jsonable
from llm_merging.core.resources import peak_memory, versions
from llm_merging.merging.settings import settings_json

logger = logging.getLogger(__name__)

SAVE_MODES = ("full", "kit", "adapter", "none")
DEFAULT_DATASETS = ["data/validation/cosmos_qa.csv", "data/validation/xsum.csv"]


@dataclass
class RunConfig:
    """Everything a run needs; the CLI fills it from its flags."""

    method: str
    dataset_filepaths: list[str] | None = None
    eval_types: list[str] | None = None
    output_folder: str = "output"
    base_model: str | None = None
    models: list[str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    time_budget: float = 3600.0
    batch_size: str | int = "auto"
    device: str | None = None
    dtype: str | None = None
    max_examples: int | None = None
    seed: int | None = None  # None: the recipe's, else 0
    recipe: str | None = None  # a mergekit-style YAML recipe (models, method, hyperparameters)
    tiny: bool = False
    evaluate: bool = True
    analyze: bool = False  # task-vector analysis of the experts (analysis.json, plots): --analyze
    baselines: bool = False  # evaluate the base and each expert alone too: --baselines
    save: str = "full"
    mc_scoring: str | None = None  # None: the method's (exact)
    adapter_rank: int | None = None  # --save adapter's rank (None: sum of the input ranks)
    progress: bool = True
    argv: list[str] = field(default_factory=list)
    search: Any = None  # a search.SearchConfig: search for the best values before the merge (--search)
    calibration_data: list[str] | None = None  # unlabeled prompts of data-aware methods: --calibration-data
    calibration_examples: int | None = None  # prompts per expert (None: the method's, 256): --calibration-examples
    lm_eval: Any = None  # an lm_eval_tasks.LMEvalConfig: lm-eval-harness tasks on the merged model (--lm-eval)


def instantiate(name: str):
    """Create the method registered as ``name`` (kit classes take ``name``; very old ones take nothing)."""
    from llm_merging.merging import get_method_class

    cls = get_method_class(name)
    name = name.rpartition(":")[2]  # "package.module:Class" runs an unregistered class as "Class"
    try:
        method = cls(name)
    except TypeError:
        method = cls()
    if getattr(method, "name", None) is None:
        method.name = name
    _ensure_our_attributes(method)
    return method


def _ensure_our_attributes(method) -> None:
    """Kit classes may skip our base ``__init__`` extras (e.g. a class with its own ``__init__`` that
    never calls ``super().__init__``); give them defaults."""
    from llm_merging.merging.Merges import Merges

    defaults = Merges(method.name)
    for key, value in vars(defaults).items():
        if not hasattr(method, key):
            setattr(method, key, value)
    for key, value in defaults.hparams.items():
        method.hparams.setdefault(key, value)


def apply_tiny(method) -> None:
    """Swap the method's models for offline tiny twins (same architecture, one per listed expert)."""
    from llm_merging.model import tiny

    arch = method.architecture if method.architecture in ("decoder", "encoder_decoder") else "decoder"
    n = max(len(method.model_refs()), 1)
    low, high = getattr(method, "expert_count", (1, None))
    n = max(low, n if high is None else min(n, high))  # as many as the method takes
    adapters = True if method.is_peft is None else bool(method.is_peft)
    method.base_model_name = str(tiny.base_dir(arch))
    method.base_model_revision_id = None
    if adapters:  # classes with their own merge() (kit style) may average A/B matrices: give equal ranks
        uniform = not method.uses_engine()
        method.list_models = [(str(tiny.lora_expert_dir(arch, i, uniform=uniform)), None) for i in range(n)]
    else:
        method.list_models = [(str(tiny.full_expert_dir(arch, i)), None) for i in range(n)]
    method.max_gen_len = min(method.max_gen_len or 16, 16)


def apply_config(method, cfg: RunConfig) -> None:
    """Apply CLI overrides (models, device, dtype, seed, hyperparameters) to a method instance."""
    if cfg.tiny:
        apply_tiny(method)
    if cfg.base_model:
        method.base_model_name = cfg.base_model
        method.base_model_revision_id = None
    if cfg.models:
        method.list_models = list(cfg.models)
        if method.uses_engine():  # the engine takes adapters and full models alike: detect each
            method.is_peft = None
    if cfg.device:
        method.device = check_device(cfg.device)
    elif method.device is not None and str(method.device) != "auto":
        try:
            check_device(str(method.device))
        except ConfigError:  # e.g. a kit class hard-coding "cuda", run on a machine without GPU
            logger.warning("method '%s' asks for device %s, which this machine lacks; using the CPU",
                           method.name, method.device)
            method.device = "cpu"
    if cfg.dtype:
        method.dtype = cfg.dtype
    elif getattr(method, "recipe", None) is not None and method.recipe.dtype:
        method.dtype = method.recipe.dtype
    if cfg.seed is not None or not getattr(method, "recipe", None) or method.recipe.seed is None:
        method.seed = 0 if cfg.seed is None else cfg.seed
    else:
        method.seed = method.recipe.seed
    method.progress = cfg.progress
    if getattr(method, "needs_calibration", False):  # data-aware methods (merging/data_aware.py)
        from llm_merging.model import tiny

        method.calibration_files = list(cfg.calibration_data or (tiny.calibration_files() if cfg.tiny else []))
        if cfg.calibration_examples is not None:
            method.calibration_examples = cfg.calibration_examples
    method.set_hyperparameters(cfg.overrides, from_text=True)  # also takes mc_scoring / adapter_rank aliases
    from llm_merging.merging.hparams import COMMON

    for key in ("mc_scoring", "adapter_rank"):
        if getattr(cfg, key) is not None:
            setattr(method, key, COMMON[key].validate(key, getattr(cfg, key)))


class Runner:
    """One run of one method; ``run()`` returns the exit status and leaves ``report``."""

    def __init__(self, cfg: RunConfig, budget: Budget | None = None) -> None:
        self.cfg = cfg
        # The CLI passes a budget counted from process start; library callers get one that starts now.
        self.budget = budget or Budget(cfg.time_budget, start=time.time())
        self.method = None
        self.out_dir = Path(cfg.output_folder) / cfg.method
        self.report: dict[str, Any] = {
            "method": cfg.method, "status": "running", "partial": False, "exit_status": None,
            "command": cfg.argv, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.procs = distributed.SINGLE  # run() joins the launched processes, if any
        self.datasets: list[str] = []
        self.examples: list[list[dict]] = []  # rows of each dataset, loaded once in preflight
        self.preflight_ok = False  # nothing is written before the preflight passed

    # -------------------------------------------------------------- phases
    def _preflight(self) -> None:
        self.preflight()
        self.prepare_adapter_sink()

    def preflight(self) -> None:
        cfg = self.cfg
        if not cfg.time_budget > 0:  # also rejects NaN
            raise ConfigError(f"--time-budget must be positive, got {cfg.time_budget}")
        if cfg.save not in SAVE_MODES:
            raise ConfigError(f"--save must be one of {', '.join(SAVE_MODES)}, got {cfg.save!r}")
        check_max_examples(cfg.max_examples, "--max-examples", minimum=1)
        if self.procs.world > 1:
            self._check_processes()
        recipe = None
        if cfg.recipe:
            from llm_merging.merging.recipe import apply_recipe, load_recipe

            if cfg.models or cfg.base_model or cfg.tiny:
                raise ConfigError(f"--recipe {cfg.recipe}: the recipe names the models; drop --base-model/--models/--tiny")
            recipe = load_recipe(cfg.recipe)
            if cfg.method and cfg.method != recipe.method:
                raise ConfigError(f"--recipe {cfg.recipe} merges with '{recipe.method}', but -m asks for '{cfg.method}'")
            cfg.method = recipe.method
            self.report["method"] = cfg.method
            self.report["recipe"] = {"path": cfg.recipe, "merge_method": recipe.document.get("merge_method")}
        method = self.method = instantiate(cfg.method)
        if recipe is not None:
            apply_recipe(method, recipe)
        if cfg.search is not None:  # --set items of a search over several methods: this method's only
            from llm_merging.search import overrides_for

            apply_config(method, dataclasses.replace(cfg, overrides=overrides_for(cfg, method.name, method.all_hyperparameters())))
        else:
            apply_config(method, cfg)
        if self.procs.world > 1:  # one device per process
            method.device = self.procs.device_for(cfg.device or method.device)
        if recipe is not None and method.hparams != method.recipe_hparams and (
                recipe.slice_lengths is not None or recipe.tokenizer is not None or recipe.chat_template is not None):
            raise ConfigError(f"--recipe {cfg.recipe} has slices or a tokenizer setting: put the --set values in the "
                              "recipe itself (recipe.yml must reproduce the run)")
        method.should_stop = self.budget.expired
        method.tokenizer_optional = not cfg.evaluate
        if cfg.evaluate:
            self._check_datasets()
        if cfg.lm_eval is not None:  # lm-eval installed, every task and its data loadable: before any merge
            from llm_merging import lm_eval_tasks

            if not cfg.evaluate:
                raise ConfigError("--lm-eval evaluates the merged model: drop --no-eval")
            self.lm_eval = lm_eval_tasks.prepare(cfg.lm_eval, progress=cfg.progress)
        if cfg.analyze or cfg.baselines:
            from llm_merging.pipeline import insight_tmp as insight

            insight.check_config(cfg, method)
        self._check_calibration_flags()
        self.report["models"] = method.preflight()
        self.out_dir = Path(cfg.output_folder) / str(method.get_name())
        if self.procs.is_main:  # process 0 writes every output
            check_output_folder(self.out_dir)
        if cfg.search is not None:  # space, search data and storage checked before any weight is loaded
            from llm_merging import search

            self.search = search.prepare(self)
        self._note_calibration()
        self.preflight_ok = True
        self.report["hyperparameters"] = jsonable(settings_json(method.hparams))
        self.report["options"] = {"mc_scoring": method.mc_scoring, "adapter_rank": method.adapter_rank}
        self.report["seed"] = method.seed
        self.report["num_processes"] = self.procs.world
        self.report["architecture"] = method.architecture
        self.report["device"] = str(method.torch_device())
        self.report["dtype"] = str(method.torch_dtype()).replace("torch.", "")

    def _check_calibration_flags(self) -> None:
        """--calibration-data / --calibration-examples only with a data-aware method (or one to search)."""
        cfg = self.cfg
        if not cfg.calibration_data and cfg.calibration_examples is None:
            return
        from llm_merging.merging import get_method_class

        names = list(cfg.search.methods or []) if cfg.search is not None else []
        classes = [type(self.method)] + [get_method_class(n) for n in names]
        if not any(getattr(c, "needs_calibration", False) for c in classes):
            flag = "--calibration-data" if cfg.calibration_data else "--calibration-examples"
            raise ConfigError(f"{flag}: method '{cfg.method}' does not use calibration data "
                              "(data-aware methods: regmean, regmean_plus, fisher, adamerging)")

    def _note_calibration(self) -> None:
        """report.json ``calibration``: the files, and whether they are also evaluated or searched (then the
        scores are optimistic, DESIGN §9)."""
        method = self.method
        if not getattr(method, "needs_calibration", False) or getattr(method, "calibration", None) is None:
            return
        from llm_merging.merging.calibration import overlapping_files

        others = list(self.datasets) if self.cfg.evaluate else []
        search = getattr(self, "search", None)
        others += list(getattr(search, "search_files", []) or [])
        overlap = overlapping_files(method.calibration, others)
        self.report["calibration"] = {"files": list(method.calibration.files), "optimistic": bool(overlap),
                                      **({"also_evaluated_or_searched": overlap} if overlap else {})}
        if overlap and self.procs.is_main:
            logger.warning("calibration data %s is also evaluation or search data: the scores are optimistic",
                           ", ".join(overlap))

    def _check_processes(self) -> None:
        """Launched as several processes: what runs data-parallel (merge, save, evaluation of the files);
        the rest is refused in one line before anything is loaded."""
        cfg, n = self.cfg, self.procs.world
        for flag, on in (("--search", cfg.search is not None), ("--baselines", cfg.baselines), ("--analyze", cfg.analyze)):
            if on:
                hint = " (several GPUs search together as workers sharing --search-storage)" if flag == "--search" else ""
                raise ConfigError(f"{flag} runs in one process, not {n}: start it with python llm_merging/main.py{hint}")
        self.report["processes"] = {"backend": self.procs.backend, "merge": None}

    def _check_datasets(self) -> None:
        from llm_merging.model import tiny
        from llm_merging.data import eval_types_for, load_examples

        cfg = self.cfg
        files = cfg.dataset_filepaths or (tiny.sample_data_files() if cfg.tiny else DEFAULT_DATASETS)
        if cfg.lm_eval is not None and not cfg.dataset_filepaths:  # --lm-eval alone: its tasks instead of kit files
            files = []
        types = eval_types_for(cfg.eval_types or None, len(files))
        sizes, self.examples = {}, []
        for i, path in enumerate(files):
            if not path.startswith("hf:") and not os.path.isfile(path):
                hint = " (pass --dataset_filepaths, or --no-eval)" if not cfg.dataset_filepaths else ""
                raise DataError(f"dataset file '{path}' does not exist{hint}")
            self.examples.append(load_examples(path, eval_type=types[i]))  # checked whole before any loading
            sizes[path] = len(self.examples[-1])
        self.datasets = list(files)
        self.report["dataset_sizes"] = sizes

    def merge(self) -> None:
        self.method.merge()
        if getattr(self.method, "base_model", None) is None:
            raise LLMMergingError(f"method '{self.cfg.method}': merge() left no model in self.base_model")
        self.report["merge_stats"] = getattr(self.method, "merge_stats", {}) or {}
        if getattr(self.method, "needs_calibration", False) and hasattr(self.method, "calibration_report"):
            self.report.setdefault("calibration", {}).update(self.method.calibration_report())
        vocabulary = getattr(self.method, "vocabulary_report", None)  # output tokenizer, or vocabulary mismatches
        if vocabulary:
            self.report["vocabulary"] = vocabulary
        recipe = getattr(self.method, "recipe", None)
        if recipe is not None and recipe.out_dtype:  # mergekit's out_dtype: the saved (and evaluated) dtype
            import torch

            if getattr(self.method, "stream_writer", None) is None:  # else the writer casts as it writes
                self.method.base_model.to(getattr(torch, recipe.out_dtype))
            self.report["out_dtype"] = recipe.out_dtype

    def _save_while_merging(self, model):
        """``--no-eval --save full`` of an engine method in one process: a `StreamingSave` that the engine
        writes the merged values into as it computes them (the merged model is never held in memory);
        None where the model must be saved whole."""
        import torch

        from llm_merging.model.save import NotStreamable, StreamingSave

        recipe = getattr(self.method, "recipe", None)
        dtype = getattr(torch, recipe.out_dtype) if recipe is not None and recipe.out_dtype else None
        try:
            return StreamingSave(model, self.out_dir / "merged_model", dtype=dtype)
        except NotStreamable as exc:
            logger.info("the merged model is written after the merge (%s)", exc)
            return None

    def _streams_to_disk(self) -> bool:
        """Whether the merge may write the saved model while it runs (see `_save_while_merging`): nothing
        after it needs the merged weights in memory."""
        from llm_merging.merging.Merges import Merges

        cfg, method = self.cfg, self.method
        return (not cfg.evaluate and cfg.save == "full" and self.procs.world == 1 and cfg.search is None
                and not cfg.analyze and not cfg.baselines and type(method).merge is Merges.merge
                and not getattr(method, "needs_calibration", False))

    def prepare_adapter_sink(self) -> None:
        """For --save adapter, collect low-rank factors while merging (before weights are overwritten)."""
        if self.cfg.save != "adapter":
            return
        if not self.method.uses_engine():
            raise ConfigError(f"--save adapter needs an engine-based method; '{self.cfg.method}' overrides merge()")
        if any(e["kind"] != "lora" for e in self.report["models"]["experts"]):
            raise ConfigError("--save adapter needs LoRA experts only; use --save full for full fine-tunes")
        from llm_merging.model.save import AdapterWriter

        self.method.delta_sink = AdapterWriter(rank=self.method.adapter_rank)  # bound to the model by the merge

    def save(self) -> None:
        from llm_merging.model.save import save_full

        mode = self.cfg.save
        method = self.method
        info = {"method": self.cfg.method, **self.report.get("models", {}), "hyperparameters": method.hparams}
        self.write_recipe()
        if mode == "none":
            return
        if mode == "kit":
            method.save_model(str(self.out_dir))
            self.report["saved"] = {"format": "kit", "path": str(self.out_dir / "safetensor.pt")}
        elif mode == "full":
            tok = getattr(method, "output_tokenizer", None)  # a recipe's tokenizer_source / chat_template
            if tok is None:
                tok = method.tokenizer if method.architecture == "encoder_decoder" else method.input_tokenizer
            writer = getattr(method, "stream_writer", None)
            if writer is not None:  # the weights were written while merging
                path = writer.finish(tok, info)
            else:
                path = save_full(method.base_model, tok, self.out_dir / "merged_model", info)
            self.report["saved"] = {"format": "full", "path": str(path), "written_while_merging": writer is not None}
            if tok is None and getattr(method, "tokenizer_note", None):
                self.report["saved"]["tokenizer"] = method.tokenizer_note
        else:
            writer = getattr(method, "delta_sink", None)
            if writer is None:
                raise ConfigError("--save adapter: the merge collected no adapter factors")
            path = writer.save(self.out_dir / "adapter", self.report["models"]["base"]["id"], info)
            self.report["saved"] = {"format": "adapter", "path": str(path),
                                    "max_relative_error": round(max(writer.errors.values()), 6),
                                    "relative_error_by_module": {m: round(e, 6) for m, e in writer.errors.items()}}

    def write_recipe(self) -> None:
        """``recipe.yml``: reproduces this merge with ``--recipe`` (models pinned to the revisions used)."""
        from llm_merging.merging.recipe import recipe_document, write_recipe

        doc = recipe_document(self.method, self.report.get("models"), dtype=self.report.get("dtype"), seed=self.method.seed)
        path = write_recipe(self.out_dir / "recipe.yml", doc)
        self.report["recipe_out"] = str(path)

    def evaluate(self) -> bool:
        """Evaluate every dataset, then the lm-eval tasks (--lm-eval); return False when the budget stopped it."""
        from llm_merging.evaluation import EvaluationResult, evaluate_model, write_scores_line

        cfg = self.cfg
        lm_eval = getattr(self, "lm_eval", None)
        if self.datasets or lm_eval is None:
            result = evaluate_model(
                self.method, self.datasets, cfg.output_folder, eval_types=cfg.eval_types,
                batch_size=cfg.batch_size, max_examples=cfg.max_examples, budget=self.budget, progress=cfg.progress,
                examples=self.examples, write_scores=lm_eval is None, processes=self.procs,
                shares=self.report["processes"].setdefault("shares", {}) if self.procs.world > 1 else None,
            )
        else:
            result = EvaluationResult(method=str(self.method.get_name()), output_dir=str(self.out_dir))
        if lm_eval is not None:  # after the kit files, in memory; one scores.jsonl line for both
            from llm_merging import lm_eval_tasks

            datasets: list = []
            try:  # none run when the kit files spent the budget
                datasets, self.report["lm_eval"] = lm_eval_tasks.evaluate(
                    self.method, lm_eval, result.output_dir, batch_size=cfg.batch_size, budget=self.budget,
                    taken={d.name for d in result.datasets})
            finally:  # the kit files' scores are kept whatever happens to the lm-eval tasks
                result.datasets.extend(datasets)
                write_scores_line(result)
                self.report["evaluation"] = jsonable(result)
            if self.report["lm_eval"].get("error"):
                raise DataError(self.report["lm_eval"]["error"])
        self.report["evaluation"] = jsonable(result)
        for ds in result.datasets:
            self.budget.phases[f"evaluate:{ds.name}"] = ds.seconds
        return not result.partial

    # -------------------------------------------------------------- driver
    def run(self) -> int:
        status = 0
        try:
            self.procs = distributed.start(timeout_s=self.cfg.time_budget + 600)  # SINGLE unless launched as several
            with self.budget.phase("preflight"):
                if self.cfg.tiny and self.procs.world > 1:  # process 0 builds the tiny models, then the others
                    self.procs.on_main(self._preflight)
                    self.procs.together(lambda: None if self.procs.is_main else self._preflight())
                else:
                    self.procs.together(self._preflight)
                if self.procs.world > 1:
                    self.report["processes"]["devices"] = self.procs.exchange(str(self.method.torch_device()))
            if self.cfg.search is not None:  # leaves self.method configured with the best candidate
                from llm_merging import search

                self._check_budget("search")
                with self.budget.phase("search"):
                    search.run(self, self.search)
                self.prepare_adapter_sink()
            self._check_budget("merge")
            if self._streams_to_disk():
                self.method.save_while_merging = self._save_while_merging
            with self.budget.phase("merge"):
                self.procs.together(self.merge)
                if self.procs.world > 1:  # every process merged: the same weights everywhere, else rank 0's
                    self.report["processes"]["merge"] = distributed.same_weights(self.procs, self.method.base_model)
            with self.budget.phase("save"):  # a finished merge is always saved, even past the budget
                self.procs.on_main(self.save)
            if self.cfg.evaluate:
                self._check_budget("evaluate")
                t0 = time.time()
                complete = self.procs.together(self.evaluate)
                self.budget.phases["evaluate"] = time.time() - t0
                if not complete:
                    raise BudgetExceeded(
                        f"time budget of {self.cfg.time_budget:g} s ran out during evaluation; finished predictions were saved"
                    )
            if self.cfg.analyze or self.cfg.baselines:
                from llm_merging.pipeline import insight_tmp as insight

                insight.run(self)
            self.report["status"] = "ok"
        except BudgetExceeded as exc:
            status = self._fail(exc, "partial", exc.exit_code)
        except KeyboardInterrupt:
            status = self._fail("interrupted (Ctrl-C); finished work was kept", "partial", 130)
        except LLMMergingError as exc:
            status = self._fail(exc, "error", exc.exit_code)
        except Exception as exc:  # an internal bug: still one line, traceback with --debug
            logger.debug("internal error", exc_info=True)
            status = self._fail(f"internal error: {type(exc).__name__}: {exc}", "error", 1)
            self.report["internal_error"] = True
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
        finally:
            writer = getattr(self.method, "stream_writer", None)
            if writer is not None:
                writer.abort()  # a model written while merging but never finished: removed (no-op once saved)
            self.report["exit_status"] = status
            self._write_report()
        return status

    def _check_budget(self, phase: str) -> None:
        if self.procs.max(int(self.budget.expired())):  # several processes: spent on any one, spent for all
            raise BudgetExceeded(f"time budget of {self.cfg.time_budget:g} s ran out before the {phase} phase")

    def _fail(self, exc: Any, status: str, code: int) -> int:
        self.report["status"] = status
        self.report["partial"] = status == "partial"
        self.report["error"] = str(exc)
        return code

    def _write_report(self) -> None:
        merge_load = getattr(self.method, "load_seconds", None) if self.method is not None else None
        phases = {}
        for k, v in self.budget.phases.items():
            if k == "merge" and merge_load is not None:  # report loading apart from the merge math
                phases["load"] = round(merge_load, 3)
                v = max(v - merge_load, 0.0)
            phases[k] = round(v, 3)
        self.report["phases_seconds"] = phases
        self.report["budget"] = {
            "seconds": self.cfg.time_budget, "elapsed": round(self.budget.elapsed(), 3),
            "remaining": round(self.budget.remaining(), 3),
        }
        self.report.update(peak_memory())
        self.report["versions"] = versions()
        self.report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if not self.preflight_ok or not self.procs.is_main:
            return
        try:
            if self.out_dir.is_dir():
                atomic_write_json(self.out_dir / "report.json", jsonable(self.report))
        except OSError as exc:
            logger.error("cannot write report.json in %s: %s", self.out_dir, exc)
        if self.out_dir.is_dir():
            from llm_merging.pipeline import insight_tmp as insight

            insight.write_report_html(self)  # logs a failure, never raises

    def summary(self) -> str:
        """A short human summary: phases and scores."""
        r = self.report
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
        lines.append(f"  report: {self.out_dir / 'report.json'}")
        if (self.out_dir / "report.html").is_file():
            lines.append(f"          {self.out_dir / 'report.html'}")
        return "\n".join(lines)


