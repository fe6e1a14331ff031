"""The search run: an Optuna study over in-memory candidates, under the run's wall-clock budget.

``prepare(runner)`` checks everything (methods, space, search data, storage) in preflight, before any
weight is loaded; ``run(runner)`` loads the base once, runs trials until ``--trials``, the budget (keeping
time to merge, save and evaluate the best) or an exhausted space stops it, writes ``search/`` and leaves
``ctx.method`` configured with the best values, for the usual merge → save → evaluate.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llm_merging.core.errors import BudgetExceeded, ConfigError, DataError, MergeError, first_line
from llm_merging.core.io import atomic_write_text
from llm_merging.data import GENERATION, MULTIPLE_CHOICE, load_examples
from llm_merging.evaluation import normalize_batch_size, unique_names
from llm_merging.lm_eval_tasks import SearchFitness
from llm_merging.lm_eval_tasks import prepare as prepare_lm_eval
from llm_merging.merging.factory import configure, instantiate
from llm_merging.merging.mergekit_names import MERGEKIT_METHODS
from llm_merging.merging.recipe import recipe_document, write_recipe
from llm_merging.model import tiny
from llm_merging.report.plots import figure, png_bytes, write_png
from llm_merging.search.candidates import Fitness, InMemoryMerger
from llm_merging.search.space import SearchSpace, build_space, candidate_values, parse_entry

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "cmaes", "grid", "random")
JOURNAL = "journal.log"


@dataclass
class SearchConfig:
    """What ``--search`` and its companion flags ask for."""

    entries: list[str] = field(default_factory=list)  # KEY=LOW:HIGH[:log], KEY=a|b, KEY[*], KEY@G, M.KEY
    methods: list[str] = field(default_factory=list)  # -m a b c (empty: the run's method)
    data: list[str] | None = None  # --search-data
    examples: int | None = None  # --search-examples: first N rows of each file
    normalize: bool = False
    sampler: str = "tpe"
    grid_points: int = 3
    trials: int | None = None
    resume: bool = False
    storage: str | None = None  # an Optuna RDB URL or journal:PATH (shared by several workers)
    study_name: str | None = None
    prune: bool = True
    prune_fraction: float = 0.3  # the first slice of each search file, scored alone for the pruner
    #: library hook: score a configured, merged candidate (``objective(method) -> float``) instead of
    #: evaluating it on the search data
    objective: Callable[[Any], float] | None = None
    #: an lm_eval_tasks.LMEvalConfig: score candidates on lm-eval-harness tasks (--search-lm-eval)
    lm_eval: Any = None

    def validate(self) -> None:
        """The options on their own (ConfigError naming the flag); files and methods are checked later."""
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--search-sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.examples is not None and self.examples < 1:
            raise ConfigError(f"--search-examples must be at least 1, got {self.examples}")
        if self.grid_points < 2:
            raise ConfigError(f"--grid-points must be at least 2, got {self.grid_points}")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(f"the pruner's first slice must be a fraction in (0, 1), got {self.prune_fraction}")
        if self.storage:
            _storage_kind(self.storage)


def _storage_kind(url: str) -> str:
    if url.startswith("journal:"):
        return "journal"
    if "://" in url and url.split("://", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "oracle", "mssql"):
        return "rdb"
    raise ConfigError(f"--search-storage {url!r}: expected an Optuna RDB URL (sqlite:///study.db, "
                      "postgresql://...) or journal:PATH (a journal file on a shared file system)")


class Search:
    """One search of a run (see the module docstring)."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx  # the run's pipeline.RunContext
        self.cfg: SearchConfig = ctx.config.search
        self.methods: dict[str, Any] = {}
        self.base_values: dict[str, dict] = {}
        self.space: SearchSpace | None = None
        self.search_rows: list[list[dict]] = []
        self.search_files: list[str] = []
        self.optimistic = False
        self.lm_eval = None  # the prepared lm-eval tasks of --search-lm-eval
        self.dir = Path(ctx.out_dir) / "search"
        self.report: dict[str, Any] = {}
        self.merger: InMemoryMerger | None = None  # the base and the experts' task vectors, from run()

    # ------------------------------------------------------------------ preflight (no weights)
    def prepare(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        primary = ctx.method
        names = list(dict.fromkeys(cfg.methods or [ctx.config.method]))
        if ctx.config.recipe and (len(names) > 1):
            raise ConfigError("--recipe with --search searches the recipe's method only; drop the extra -m methods")
        cfg.validate()
        models = ctx.report["models"]
        key = _models_key(models)
        for name in names:
            if name == primary.name:
                method = primary
            else:
                method = instantiate(name)
                configure(method, ctx.config.method_options(name, method.all_hyperparameters()))
                method.should_stop = ctx.budget.expired
                if _models_key(method.preflight()) != key:
                    raise ConfigError(f"-m {' '.join(names)}: method '{name}' merges other models than '{primary.name}'; "
                                      "give the same models to all with --base-model/--models")
            if not method.uses_engine():
                raise ConfigError(f"--search: method '{name}' has its own merge(); the search merges candidates "
                                  "through merge_tensor (engine methods only)")
            recipe = method.recipe
            if recipe is not None and (recipe.slice_lengths or recipe.tokenizer or recipe.chat_template):
                raise ConfigError(f"--search with --recipe {recipe.path}: slices and tokenizer settings cannot be searched; "
                                  "use a recipe with 'models:' and no tokenizer")
            self.methods[name] = method
            self.base_values[name] = copy.deepcopy(method.hparams)
        if len(names) > 1:
            for key in ctx.config.overrides:
                if "." not in key and not any(key in m.all_hyperparameters() for m in self.methods.values()):
                    raise ConfigError(f"--set {key}: unknown hyperparameter for every method of -m {' '.join(names)}")
        n_experts = len(models["experts"])
        entries = [parse_entry(e) for e in cfg.entries]
        recipe = primary.recipe
        where = lambda head: f"--search {head}"  # noqa: E731
        if recipe is not None:
            section = ((recipe.document.get("llm_merging") or {}).get("search"))
            if section is not None:
                if not isinstance(section, dict) or not section:
                    raise ConfigError(f"recipe {recipe.path}: llm_merging.search: expected a mapping KEY: RANGE")
                entries = [(str(k), v) for k, v in section.items()] + entries
                where = lambda head: f"--search {head} (or recipe {recipe.path}: llm_merging.search)"  # noqa: E731
        specs = {n: {k: p for k, p in m.all_hyperparameters().items()} for n, m in self.methods.items()}
        fixed = {n: set(ctx.config.overrides_for(n, specs[n])) for n in names}
        if recipe is not None and recipe.method in fixed:  # values the recipe sets leave the default space too
            mk = MERGEKIT_METHODS.get(recipe.mergekit_method or "")
            doc = recipe.document
            named = set((doc.get("parameters") or {}))
            for entry in doc.get("models") or []:
                if isinstance(entry, dict):
                    named |= set(entry.get("parameters") or {})
            fixed[recipe.method] |= {mk.params.get(k, k) if mk is not None else k for k in named}
        self.space = build_space(names, specs, n_experts, entries, where, fixed)
        for name, method in self.methods.items():  # best.yml must be writable for this method's values
            self._recipe_doc(method)
        self._prepare_data()
        if cfg.resume and not cfg.storage and not (self.dir / JOURNAL).is_file():
            raise ConfigError(f"--resume: no search journal at {self.dir / JOURNAL} (run once without --resume)")
        self.report = {"dir": str(self.dir), "methods": names, "space": self.space.describe(),
                       "sampler": cfg.sampler, "seed": primary.seed, "storage": cfg.storage or str(self.dir / JOURNAL),
                       "search_data": {p: len(r) for p, r in zip(self.search_files, self.search_rows)},
                       "normalize": cfg.normalize, "optimistic": self.optimistic}
        if self.lm_eval is not None:
            self.report["search_lm_eval"] = {"tasks": list(cfg.lm_eval.tasks), "args": dict(cfg.lm_eval.args)}

    def _prepare_data(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        if cfg.objective is not None:
            return
        if cfg.lm_eval is not None:  # lm-eval tasks instead of files: checked (and their data loaded) now
            if cfg.data:
                raise ConfigError("--search-lm-eval and --search-data: score the candidates on one of them")
            if cfg.normalize:
                raise ConfigError("--normalize needs --search-data (no expert baselines on lm-eval tasks)")
            self.lm_eval = prepare_lm_eval(cfg.lm_eval, progress=False)
            final = ctx.config.lm_eval if ctx.config.evaluate else None
            overlap = sorted(set(cfg.lm_eval.tasks) & set(final.tasks)) if final is not None else []
            if overlap:
                self.optimistic = True
                logger.warning("search tasks %s are also evaluated: the final scores are optimistic", ", ".join(overlap))
            return
        files = cfg.data
        if not files and ctx.config.tiny:
            files = [f for f in tiny.sample_data_files() if not f.endswith(".csv")]  # the labelled samples
        if not files:
            raise ConfigError("--search needs --search-data FILES: held-out data with labels (kit JSON lines or CSV)")
        for path in files:
            if not path.startswith("hf:") and not os.path.isfile(path):
                raise DataError(f"--search-data: file '{path}' does not exist")
            rows = load_examples(path)
            if cfg.examples is not None:
                rows = rows[: cfg.examples]
            missing = [r for r in rows if not ((r["eval_type"] == MULTIPLE_CHOICE and "label" in r) or
                                               (r["eval_type"] == GENERATION and r.get("target") is not None))]
            if not rows or missing:
                raise DataError(f"--search-data {path}: {len(missing)} of {len(rows)} rows have no label (multiple choice) "
                                "or target (generation); search data needs gold answers")
            self.search_rows.append(rows)
            self.search_files.append(path)

    # ------------------------------------------------------------------ the search phase
    def run(self) -> None:
        import optuna

        ctx, cfg = self.ctx, self.cfg
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        primary = ctx.method
        t_start = time.time()
        evaluated = {os.path.realpath(p) for p in ctx.datasets} if ctx.config.evaluate else set()
        overlap = [p for p in self.search_files if os.path.realpath(p) in evaluated]
        if overlap:  # the evaluation files are known once every phase's preflight ran
            self.optimistic = self.report["optimistic"] = True
            logger.warning("search data %s is also evaluated: the final scores are optimistic", ", ".join(overlap))
        ctx.report["search"] = self.report  # filled in as the search goes (also when it stops early)
        merger = InMemoryMerger(primary, progress=ctx.config.progress)
        self.merger = merger
        for m in self.methods.values():
            merger.share_with(m)
        self.report["setup_seconds"] = round(merger.setup_seconds, 3)
        self.report["cache"] = dict(zip([str(e.name) for e in merger.experts], merger.cache_kinds))
        fitness = None
        if self.lm_eval is not None:
            fitness = SearchFitness(self.lm_eval, batch_size=ctx.config.batch_size)
        elif cfg.objective is None:
            first = [max(1, math.ceil(len(r) * cfg.prune_fraction)) if cfg.prune else len(r) for r in self.search_rows]
            fitness = Fitness(unique_names(self.search_files), self.search_rows, first,
                              batch_size=normalize_batch_size(ctx.config.batch_size))
            if cfg.normalize:
                self._baselines(merger, fitness)
        self.fitness = fitness
        study, own = self._study()
        try:
            stopped = self._loop(study, merger, fitness, own)
        finally:
            merger.restore()
        self.report["stopped_because"] = stopped
        self._finish(study)
        merger.release()
        self.report["seconds"] = round(time.time() - t_start, 3)

    def _baselines(self, merger, fitness) -> None:
        """Each expert alone (θ₀ + τᵢ) on every search file; the best per file normalises the objective."""
        method = self.ctx.method
        per: dict[str, dict[str, float | None]] = {}
        best = [0.0] * len(fitness.rows)
        saved_first = fitness.first
        fitness.first = [len(r) for r in fitness.rows]
        try:
            for i, e in enumerate(merger.experts):
                merger.apply(lambda name, base, tvs, i=i: tvs[i])
                out = fitness.evaluate(method, remaining=self.ctx.budget.remaining)
                per[str(e.name)] = out["primary"]
                for f, v in enumerate(out["primary"].values()):
                    if v is not None and v > best[f]:
                        best[f] = v
                if out["partial"]:
                    raise BudgetExceeded(f"time budget of {self.ctx.config.time_budget:g} s ran out while scoring "
                                         "the experts for --normalize")
        finally:
            fitness.first = saved_first
            merger.restore()
        for f, v in enumerate(best):
            if v <= 0:
                logger.warning("--normalize: no expert scores above 0 on %s; that file is not normalised", fitness.names[f])
        fitness.baselines = best
        self.report["expert_scores"] = per
        self.report["normalized_by"] = dict(zip(fitness.names, best))

    def _study(self):
        """The Optuna study (created, resumed or shared) and whether this process owns its storage."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        cfg = self.cfg
        seed = int(self.ctx.method.seed)
        name = cfg.study_name or "llm_merging-" + hashlib.sha1(
            json.dumps(self.space.describe()).encode()).hexdigest()[:12]
        own = not cfg.storage
        if own:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / JOURNAL
            if path.exists() and not cfg.resume:
                path.unlink()  # a fresh search; --resume continues the journalled one
            storage = JournalStorage(JournalFileBackend(str(path)))
        elif _storage_kind(cfg.storage) == "journal":
            path = cfg.storage[len("journal:"):]
            path = path[2:] if path.startswith("//") else path
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(path))
        else:
            storage = optuna.storages.RDBStorage(cfg.storage)
        existing = [s.study_name for s in optuna.get_all_study_summaries(storage)] if own else []
        if own and cfg.resume and cfg.study_name is None and existing and name not in existing:
            raise ConfigError(f"--resume: the search space differs from the journalled study's in {self.dir / JOURNAL}; "
                              "run without --resume to start a new search")
        probe = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
        n_before = len(probe.trials)
        if own and cfg.resume:  # trials left running by a stopped search will never finish
            from optuna.trial import TrialState

            for t in probe.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                probe._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        worker_seed = seed + n_before
        if not own:  # workers started with the same command must not propose the same points
            worker_seed += int(hashlib.sha1(f"{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:6], 16)
        sampler = self._sampler(worker_seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0) if cfg.prune else optuna.pruners.NopPruner()
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
        stored = study.user_attrs.get("space")
        if stored is None:
            study.set_user_attr("space", self.space.describe())
        elif stored != self.space.describe():
            raise ConfigError(f"study '{name}' holds another search space ({'; '.join(stored)}); "
                              "give another --search-study or the same --search entries")
        self.report.update({"study_name": name, "sampler_seed": worker_seed, "trials_before": n_before})
        return study, own

    def _grid(self) -> dict[str, list]:
        import numpy as np

        k = self.cfg.grid_points
        grid: dict[str, list] = {}
        if len(self.space.methods) > 1:
            grid["method"] = list(self.space.methods)
        for m in self.space.methods:
            for d in self.space.dims[m]:
                if d.kind == "categorical":
                    values = list(d.choices)
                elif d.log:
                    values = [float(v) for v in np.geomspace(d.low, d.high, k)]
                else:
                    values = [float(v) for v in np.linspace(d.low, d.high, k)]
                if d.kind == "int":
                    values = sorted({int(round(v)) for v in values})
                for name, _, _ in self.space.param_names(m, d):
                    grid[name] = values
        return grid

    def _sampler(self, seed: int):
        import optuna

        s = self.cfg.sampler
        if s == "tpe":
            with warnings.catch_warnings():  # multivariate/group are "experimental" (stable since Optuna 3)
                warnings.simplefilter("ignore")
                return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=len(self.space.methods) > 1)
        if s == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)  # categoricals: random
        if s == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return _Grid(self._grid(), seed=seed)

    def _suggest(self, trial) -> tuple[str, dict[str, Any]]:
        space = self.space
        method = trial.suggest_categorical("method", space.methods) if len(space.methods) > 1 else space.methods[0]
        params: dict[str, Any] = {}
        for d in space.dims[method]:
            for name, _, _ in space.param_names(method, d):
                if d.kind == "categorical":
                    params[name] = trial.suggest_categorical(name, list(d.choices))
                elif d.kind == "int":
                    params[name] = trial.suggest_int(name, int(d.low), int(d.high), log=d.log)
                else:
                    params[name] = trial.suggest_float(name, d.low, d.high, log=d.log)
        return method, params

    def configure(self, method_name: str, params: dict[str, Any]):
        """The method instance of ``method_name`` with the trial's values (ConfigError when infeasible)."""
        method = self.methods[method_name]
        method.hparams = copy.deepcopy(self.base_values[method_name])
        values = candidate_values(self.space, method_name, params, method.hparams)
        method.set_hyperparameters(values)
        method.check_all_tensors(self.merger.names if self.merger is not None else [])
        return method

    # ------------------------------------------------------------------ budget
    def reserve(self) -> float:
        """Seconds to keep for the final merge, save and evaluation of the best candidate."""
        ctx = self.ctx
        merger = self.merger
        est = 1.5 * merger.setup_seconds + 2.0 + (self._mean("merge_seconds") or 0.0)
        if ctx.config.save != "none":
            est += sum(p.numel() * p.element_size() for p in merger.model.parameters()) / 150e6 + 2.0
        if ctx.config.evaluate and ctx.examples:
            rates = self.fitness.seconds_per_example if self.fitness is not None else {}
            fallback = max(rates.values()) if rates else 0.0
            cap = ctx.config.max_examples
            for rows in ctx.examples:
                rows = rows[:cap] if cap else rows
                for r in rows:
                    est += 1.3 * rates.get(r["eval_type"], fallback)
        return est

    def _mean(self, key: str) -> float | None:
        vals = self._seconds.get(key) or []
        return sum(vals[-5:]) / len(vals[-5:]) if vals else None

    def _n_counted(self, study) -> int:
        from optuna.trial import TrialState

        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.FAIL, TrialState.RUNNING)))

    def _loop(self, study, merger, fitness, own: bool) -> str:
        from optuna.trial import TrialState
        from tqdm.auto import tqdm

        cfg, budget = self.cfg, self.ctx.budget
        self._seconds: dict[str, list[float]] = {"merge_seconds": [], "eval_seconds": [], "seconds": []}
        seen: dict[str, float] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if "key" in t.user_attrs:
                seen[t.user_attrs["key"]] = t.value
        grid_size = math.prod(len(v) for v in self._grid().values()) if cfg.sampler == "grid" else None
        size = self.space.size()
        worker = f"{socket.gethostname()}:{os.getpid()}"
        done_here = 0
        duplicates = 0
        errors: list[str] = []
        bar = tqdm(total=cfg.trials, desc="search", unit="trial", disable=not self.ctx.config.progress, leave=False)
        stopped = "budget"
        try:
            while True:
                n = self._n_counted(study)
                if cfg.trials is not None and n >= cfg.trials:
                    stopped = "trials"
                    break
                if grid_size is not None and n >= grid_size or len(seen) >= size:
                    stopped = "space exhausted"
                    break
                if duplicates >= 25:
                    stopped = "space exhausted (the sampler keeps proposing evaluated candidates)"
                    break
                reserve = self.reserve()
                need = self._mean("seconds") or 0.0
                if budget.remaining() - reserve < need or budget.remaining() - reserve <= 0:
                    stopped = "budget"
                    logger.info("search stops: %.1f s left, %.1f s kept for the final merge, save and evaluation, "
                                "a trial takes about %.1f s", budget.remaining(), reserve, need)
                    break
                trial = study.ask()
                method_name, params = self._suggest(trial)
                key = json.dumps([method_name, sorted(params.items())], default=str)
                trial.set_user_attr("worker", worker)
                trial.set_user_attr("key", key)
                if key in seen:  # the same candidate again: its score, not a second evaluation
                    trial.set_user_attr("cached", True)
                    study.tell(trial, seen[key])
                    duplicates += 1
                    bar.update(1)
                    continue
                duplicates = 0
                t0 = time.time()
                try:
                    method = self.configure(method_name, params)
                    merge_s = merger.apply(method.merge_resolved)
                except (ConfigError, MergeError) as exc:
                    merger.restore()
                    trial.set_user_attr("error", first_line(exc))
                    errors.append(first_line(exc))
                    study.tell(trial, state=TrialState.FAIL)
                    logger.info("trial %d: infeasible candidate: %s", trial.number, first_line(exc))
                    bar.update(1)
                    continue
                t1 = time.time()
                deadline = t1 + max(budget.remaining() - reserve, 0.0)
                if cfg.objective is not None:
                    out = {"value": float(cfg.objective(method)), "scores": {}, "primary": {}, "pruned": False,
                           "partial": False}
                else:
                    def report(value: float, trial=trial) -> bool:
                        trial.report(value, 0)
                        return trial.should_prune()

                    out = fitness.evaluate(method, remaining=lambda: deadline - time.time(),
                                           report=report if cfg.prune else None)
                merger.restore()
                eval_s = time.time() - t1
                for k, v in (("merge_seconds", merge_s), ("eval_seconds", eval_s), ("seconds", time.time() - t0)):
                    self._seconds[k].append(v)
                    trial.set_user_attr(k, round(v, 4))
                trial.set_user_attr("scores", out["scores"])
                trial.set_user_attr("primary", out["primary"])
                done_here += 1
                bar.update(1)
                if out["partial"]:
                    trial.set_user_attr("error", "stopped by the time budget")
                    study.tell(trial, state=TrialState.FAIL)
                    stopped = "budget"
                    break
                if out["pruned"]:
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
                value = out["value"]
                if not math.isfinite(value):
                    trial.set_user_attr("error", "no score")
                    study.tell(trial, state=TrialState.FAIL)
                    continue
                study.tell(trial, value)
                seen[key] = value
                if done_here % 5 == 1 or cfg.trials is not None and cfg.trials <= 50:
                    self._write_trials(study)
        except KeyboardInterrupt:
            self._write_trials(study)
            raise
        finally:
            bar.close()
        self.report["trials_this_worker"] = done_here
        self._errors = errors
        return stopped

    # ------------------------------------------------------------------ outputs
    def _finish(self, study) -> None:
        from optuna.trial import TrialState

        self._write_trials(study)
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in
                  (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
        counts["cached"] = sum(bool(t.user_attrs.get("cached")) for t in trials)
        self.report["trials"] = {"total": len(trials), **counts}
        per = {k: self._mean(k) for k in ("merge_seconds", "eval_seconds", "seconds")}
        self.report["seconds_per_candidate"] = {k: (round(v, 4) if v is not None else None) for k, v in per.items()}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            if self._errors and self.report.get("stopped_because") != "budget":
                raise ConfigError(f"--search: every candidate failed; first error: {self._errors[0]}")
            raise BudgetExceeded(f"time budget of {self.ctx.config.time_budget:g} s left no time for a search trial "
                                 "and the final merge, save and evaluation")
        best = study.best_trial
        method_name = best.params.get("method", self.space.methods[0])
        params = {k: v for k, v in best.params.items() if k != "method"}
        method = self.configure(method_name, params)
        doc = self._recipe_doc(method)

        write_recipe(self.dir / "best.yml", doc)
        self.report["best"] = {"number": best.number, "value": best.value, "method": method_name, "params": params,
                               "scores": best.user_attrs.get("scores"), "recipe": str(self.dir / "best.yml")}
        self._plots(study)
        self.best_method = method
        logger.info("search: best trial %d of %d, %s %.4f: %s", best.number, len(trials), method_name, best.value,
                    ", ".join(f"{k}={_short(v)}" for k, v in params.items()))

    def _recipe_doc(self, method) -> dict:
        ctx = self.ctx
        recipe = method.recipe
        method.recipe = None  # our vocabulary, with the searched values (the recipe document holds the old ones)
        try:
            return recipe_document(method, ctx.report.get("models"), dtype=ctx.report.get("dtype"), seed=method.seed)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"--search: the values of method '{method.name}' cannot be written as a recipe "
                              f"({first_line(exc)}); set them without recipe slices/precedence") from None
        finally:
            method.recipe = recipe

    def _write_trials(self, study) -> None:
        trials = study.get_trials(deepcopy=False)
        params = list(dict.fromkeys(k for t in trials for k in t.params))
        files = list(dict.fromkeys(f for t in trials for f in (t.user_attrs.get("scores") or {})))
        metrics = {f: list(dict.fromkeys(m for t in trials for m in ((t.user_attrs.get("scores") or {}).get(f) or {})))
                   for f in files}
        head = (["number", "state", "value"] + params + [f"{f}:{m}" for f in files for m in metrics[f]] +
                ["seconds", "merge_seconds", "eval_seconds", "pruned", "cached", "worker", "error"])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        for t in trials:
            a = t.user_attrs
            scores = a.get("scores") or {}
            w.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value] +
                       [t.params.get(p, "") for p in params] +
                       [(scores.get(f) or {}).get(m, "") for f in files for m in metrics[f]] +
                       [a.get("seconds", ""), a.get("merge_seconds", ""), a.get("eval_seconds", ""),
                        t.state.name == "PRUNED", bool(a.get("cached")), a.get("worker", ""), a.get("error", "")])
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "trials.csv", buf.getvalue())

    def _plots(self, study) -> None:
        """``history.png`` (score per trial, best so far) and ``importance.png`` (PED-ANOVA importances)."""
        import optuna
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        fig = figure(7, 4)
        ax = fig.add_subplot()
        ax.scatter([t.number for t in done], [t.value for t in done], s=14, label="trial")
        pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
        if pruned:
            ax.scatter([t.number for t in pruned], [list(t.intermediate_values.values())[-1] for t in pruned],
                       s=14, marker="x", color="grey", label="pruned (score on the first slice)")
        best, xs, ys = -math.inf, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = max(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C3", label="best so far")
        ax.set_title(f"search: {len(done)} scored trials of {len(trials)}")
        ax.set_xlabel("trial")
        ax.set_ylabel("score / best expert's score" if self.cfg.normalize else "score (mean over search files)")
        ax.legend(loc="lower right")
        write_png(self.dir / "history.png", png_bytes(fig))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            imp = None
            logger.info("search: no parameter importance (%s)", first_line(exc))
        if not imp:
            self.report["importance"] = None
            return
        self.report["importance"] = {k: round(float(v), 4) for k, v in imp.items()}
        fig = figure(7, 1.2 + 0.4 * len(imp))
        ax = fig.add_subplot()
        keys = list(imp)[::-1]
        ax.barh(keys, [imp[k] for k in keys])
        ax.set_title("which hyperparameters mattered")
        ax.set_xlabel("importance (PED-ANOVA, share of the total)")
        write_png(self.dir / "importance.png", png_bytes(fig))


def _grid_sampler():
    import optuna

    class Grid(optuna.samplers.GridSampler):
        """Optuna's grid, without its ``study.stop()`` once the grid is used up (that only works inside
        ``study.optimize``; the search loop counts the grid itself)."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return Grid


def _Grid(grid: dict, seed: int):
    return _grid_sampler()(grid, seed=seed)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _models_key(models: dict) -> tuple:
    return (models["base"]["path"], tuple(e["path"] for e in models["experts"]))


def prepare(ctx) -> Search:
    """Check the search of the run ``ctx`` (a pipeline.RunContext; its preflight: no weights loaded)."""
    search = Search(ctx)
    search.prepare()
    return search


def run(ctx, search: Search) -> dict[str, Any]:
    """The search phase: makes the best candidate the run's method; returns the report section."""
    search.run()
    best = search.best_method
    best.base_model = best.merged_model = None
    best.experts = []
    ctx.set_method(best)
    if search.optimistic:
        search.report["note"] = "the search data is also evaluated: the final scores are optimistic"
    return search.report
