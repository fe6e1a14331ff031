"""The chain phase: a chained recipe's merges before the final one (``--recipe`` with several YAML
documents, mergekit-multi's format, :mod:`llm_merging.merging.chain`), then the final merge made the run's
method for the merge, save and evaluate phases.

Each merge before the final one runs as a run of its own through the merge and save phases (the model
written while merging, as ``--no-eval --save full`` does) into a model directory that the merges after it
read by path. Those directories are kept in memory (a scratch folder on the RAM-backed ``/dev/shm``) when
every intermediate merge alive at once, plus the largest model a merge loads, fits the available memory;
else in a scratch folder of ``$TMPDIR``; both are removed as soon as no merge reads them any more and
whatever way the run ends. ``--save-intermediates`` writes them to ``OUTPUT/METHOD/NAME/`` instead (kept).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llm_merging.core.errors import ConfigError, LLMMergingError, ModelNotFoundError
from llm_merging.core.io import scratch_dir
from llm_merging.core.outputs import sweep
from llm_merging.core.resources import available_bytes
from llm_merging.merging.chain import MergeChain, Step, is_chain, references, substitute, unknown_hint
from llm_merging.merging.Merges import Merges
from llm_merging.merging.recipe import parse_recipe, reproducing_document
from llm_merging.model.refs import ModelRef, hf_token, is_adapter_dir
from llm_merging.model.save import estimate_saved_bytes
from llm_merging.pipeline.build import configured_method
from llm_merging.pipeline.config import InsightConfig, RunConfig
from llm_merging.pipeline.context import Phase, RunContext
from llm_merging.pipeline.phases.merge import MergePhase
from llm_merging.pipeline.phases.save import SavePhase

logger = logging.getLogger(__name__)

#: the RAM-backed folder that holds intermediate merges kept in memory
MEMORY_DIR = Path("/dev/shm")
#: intermediate merges are kept in memory while they and the largest model a merge loads take at most this
#: share of the available memory
MEMORY_SHARE = 0.8
#: names that would land on the run's own outputs under --save-intermediates
RESERVED_OUTPUTS = {"merged_model", "adapter", "predictions", "lm_eval", "search", "plots", "recipe.yml",
                    "report.json", "report.html", "scores.jsonl", "safetensor.pt"}


class ChainPhase(Phase):
    """Run the merges a chained recipe makes before its final one; make the final one the run's method."""

    name = "chain"
    timed = False  # each merge adds to the run's "load", "merge" and "save" lines; report.json "chain" has each
    needs_weights = False  # the final merge runs after it, in the merge phase

    def __init__(self) -> None:
        self.mode: str | None = None  # "memory", "disk" (scratch folders) or "saved" (--save-intermediates)
        self.sizes: dict[str, int] = {}  # bytes of each intermediate merge (from its base's headers)
        self.peak = 0  # bytes of the intermediate merges alive at once, at most
        self.root: Path | None = None  # the scratch folder holding them (memory, disk)

    def enabled(self, config: RunConfig) -> bool:
        return bool(config.recipe) and is_chain(config.recipe)

    # -------------------------------------------------------------- preflight
    def check(self, ctx: RunContext) -> None:
        """Options that fit a chain; every model a merge reads is a merge of the file or a model that
        exists; every merge's values checked, and each merge that reads only models checked as a run checks
        its models (the others once the merges they read are made); where the intermediates go."""
        chain, cfg = ctx.chain, ctx.config
        if chain is None:
            raise ConfigError(f"--recipe {cfg.recipe}: not a chained recipe")
        self._check_options(ctx, chain)
        paths = self._resolve(chain)
        dtypes: dict[str, torch.dtype | None] = {}
        for step in chain.steps[:-1]:
            method = configured_method(step_config(cfg, step), ctx, step.recipe)
            if not step.inputs:
                preflighted(method, f"recipe {chain.path} {step.label}")
            dtypes[step.name] = saved_dtype(method)
        for step in chain.steps[:-1]:
            self.sizes[step.name] = estimate_saved_bytes(self._root_model(chain, step.name, paths), dtypes[step.name])
        loads = [estimate_saved_bytes(self._root_model(chain, s.recipe.base_model, paths),
                                      dtypes.get(s.name) if s is not chain.final else saved_dtype(ctx.method))
                 for s in chain.steps]
        self.peak = peak_bytes(chain, self.sizes)
        if cfg.save_intermediates:
            self.mode = "saved"
            for name in chain.names:
                if name in RESERVED_OUTPUTS:
                    raise ConfigError(f"--save-intermediates: recipe {chain.path} {chain.step(name).label}: the name "
                                      f"'{name}' is an output of the run itself; rename the merge")
        else:
            self.mode = "memory" if fits_in_memory(self.peak, max(loads, default=0)) else "disk"
        ctx.report["models"] = self._planned_models(chain, paths)
        logger.info("chained recipe %s: %d merges (%s), intermediates %s (%.1f MiB at most at once)", chain.path,
                    len(chain.steps), " -> ".join(s.name or "final" for s in chain.steps), self.mode,
                    self.peak / 2**20)

    def _check_options(self, ctx: RunContext, chain: MergeChain) -> None:
        cfg = ctx.config
        refused = [("--set", bool(cfg.overrides), "set each merge's values in its document"),
                   ("--search", cfg.search is not None, "search one merge at a time"),
                   ("--resume", cfg.resume, "the chain is merged again from the start"),
                   ("--analyze", cfg.insight.analyze, "analyze the experts of one merge at a time"),
                   ("--baselines", cfg.insight.baselines, "evaluate the experts of one merge at a time"),
                   ("--calibration-data" if cfg.calibration.data else "--calibration-examples", cfg.calibration.given,
                    "data-aware methods run one merge at a time")]
        for flag, on, hint in refused:
            if on:
                raise ConfigError(f"{flag}: recipe {chain.path} chains {len(chain.steps)} merges; {hint}")
        if ctx.processes.world > 1:
            raise ConfigError(f"recipe {chain.path} chains {len(chain.steps)} merges: run it in one process "
                              "(python llm_merging/main.py)")
        if cfg.save == "adapter" and chain.final.recipe.base_model in chain.names:
            raise ConfigError(f"--save adapter: the base model of recipe {chain.path} {chain.final.label} is the merge "
                              f"'{chain.final.recipe.base_model}', which exists only during the run; use --save full")

    def _resolve(self, chain: MergeChain) -> dict[str, Path]:
        """Every model reference that is not a merge of the chain, resolved (one line naming the document)."""
        out: dict[str, Path] = {}
        names = set(chain.names)
        for step in chain.steps:
            for ref in references(step.recipe):
                if ref in names or ref in out:
                    continue
                try:
                    out[ref] = ModelRef.parse(ref).resolve(hf_token())
                except LLMMergingError as exc:
                    listed = ", ".join(chain.names)
                    raise ModelNotFoundError(
                        f"recipe {chain.path} {step.label}: '{ref}' is neither a merge of this file ({listed}) "
                        f"nor a model{unknown_hint(ref, chain)}: {exc}") from None
        return out

    def _root_model(self, chain: MergeChain, ref: str, paths: dict[str, Path]) -> Path:
        """The model whose tensors a reference's have the shapes of: a merge's base model, followed down."""
        seen = set()
        while ref in chain.names and ref not in seen:
            seen.add(ref)
            ref = chain.step(ref).recipe.base_model
        return paths[ref]

    def _planned_models(self, chain: MergeChain, paths: dict[str, Path]) -> dict[str, Any]:
        """report.json ``models`` of the final merge until its inputs exist: an intermediate merge stands as
        ``chain_merge`` with the path of the model its shapes come from (what the disk checks measure)."""
        def entry(ref: str) -> dict[str, Any]:
            if ref in chain.names:
                return {"id": ref, "revision": None, "resolved_revision": None,
                        "path": str(self._root_model(chain, ref, paths)), "kind": "full", "chain_merge": ref}
            parsed = ModelRef.parse(ref)
            return {"id": parsed.id, "revision": parsed.revision, "resolved_revision": None, "path": str(paths[ref]),
                    "kind": "lora" if is_adapter_dir(paths[ref]) else "full"}

        final = chain.final.recipe
        base = entry(final.base_model)
        base.pop("kind")
        return {"base": base, "experts": [entry(m) for m in final.models]}

    def expected_outputs(self, ctx: RunContext) -> list[str]:
        if self.mode != "saved" or ctx.chain is None:
            return []
        return [f"{name}/{what}" for name in ctx.chain.names for what in ("merged_model/", "recipe.yml")]

    def disk_space(self, ctx: RunContext) -> list[tuple[Path, int, str]]:
        if self.mode == "saved":
            return [(ctx.out_dir, sum(self.sizes.values()), "the chain's intermediate merges (--save-intermediates)")]
        if self.mode == "disk":
            return [(Path(scratch_parent()), self.peak, "the chain's intermediate merges (temporary)")]
        return []

    # -------------------------------------------------------------- the merges
    def run(self, ctx: RunContext) -> dict[str, Any] | None:
        chain, cfg = ctx.chain, ctx.config
        if MEMORY_DIR.is_dir():
            sweep(MEMORY_DIR, scratch=True)  # intermediates of chains whose process was killed ($TMPDIR: the runner's)
        if self.mode == "saved":
            self.root = Path(ctx.out_dir)
        else:
            self.root = scratch_dir("chain", MEMORY_DIR if self.mode == "memory" else None)
        paths: dict[str, str] = {}  # merge name -> its model directory
        documents: list[dict[str, Any]] = []
        merges: list[dict[str, Any]] = []
        last = chain.last_use()
        for i, step in enumerate(chain.steps[:-1]):
            ctx.check_budget(f"chain merge '{step.name}'")
            folder = self.root / step.name
            record, document = self._merge(ctx, step, paths, folder)
            paths[step.name] = str((folder / "merged_model").resolve())
            documents.append({"name": step.name, **document})
            merges.append(record)
            if self.mode != "saved":  # no later merge reads these: their memory (or disk) back now
                for name in [n for n in paths if last.get(n) == i]:
                    shutil.rmtree(self.root / name, ignore_errors=True)
        # the final merge: the run's method from here on (merge, save, evaluate)
        final = chain.final
        where = f"recipe {chain.path} {final.label}"
        recipe = parse_recipe(substitute(final.document, paths), f"{chain.path} {final.label}")
        recipe.document, recipe.name, recipe.chain = final.document, final.name, documents
        method = configured_method(cfg, ctx, recipe)
        models = preflighted(method, where)
        mark_merges(models, paths)
        ctx.method = method
        ctx.report["models"] = models
        ctx.report["architecture"] = method.architecture
        ctx.report["dtype"] = str(method.torch_dtype()).replace("torch.", "")
        return {"merges": merges, "final": {"document": final.index, "name": final.name},
                "intermediates": self.mode, "intermediate_bytes_at_once": self.peak,
                **({"folder": str(self.root)} if self.mode == "saved" else {})}

    def _merge(self, ctx: RunContext, step: Step, paths: dict[str, str], folder: Path) -> tuple[dict, dict]:
        """One merge before the final one, through the merge and save phases into ``folder``; returns its
        report.json entry and its document as it ran (for the run's recipe.yml)."""
        chain = ctx.chain
        where = f"recipe {chain.path} {step.label}"
        recipe = parse_recipe(substitute(step.document, paths), f"{chain.path} {step.label}")
        recipe.name = step.name
        config = step_config(ctx.config, step)
        method = configured_method(config, ctx, recipe)
        method.tokenizer_optional = True  # as a --no-eval run: a base without tokenizer files still merges
        sub = RunContext(config=config, budget=ctx.budget, method=method, processes=ctx.processes, out_dir=folder)
        sub.report["models"] = models = preflighted(method, where)
        sub.report["dtype"] = str(method.torch_dtype()).replace("torch.", "")
        merge, save = MergePhase(), SavePhase()
        sub.phases = [merge, save]
        sub.preflight_ok = True
        logger.info("chain: merge '%s' (%s, %s)", step.name, step.label, recipe.method)
        t0 = time.time()
        try:
            merge.check(sub)
            merge.run(sub)
            with ctx.budget.phase("save"):
                saved = save.run(sub)
        finally:
            merge.finish(sub)  # a model half written is removed
        mark_merges(models, paths)
        record = {"name": step.name, "document": step.index, "method": recipe.method,
                  "merge_method": step.document.get("merge_method"), "models": models,
                  "dtype": sub.report["dtype"], "seed": method.seed, "merge_stats": sub.report.get("merge_stats"),
                  "bytes": self.sizes.get(step.name), "seconds": round(time.time() - t0, 3),
                  **({"saved": saved["path"]} if self.mode == "saved" and saved else {})}
        document = reproducing_document(step.document, models, dtype=sub.report["dtype"], seed=method.seed)
        del method, sub, merge, save
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return record, document

    def finish(self, ctx: RunContext) -> None:
        """The scratch folder of the intermediate merges removed, however the run ended."""
        if self.root is not None and self.mode != "saved":
            shutil.rmtree(self.root, ignore_errors=True)


def step_config(config: RunConfig, step: Step) -> RunConfig:
    """The run configuration of one merge before the final one: merged and saved whole, not evaluated."""
    return dataclasses.replace(config, method=step.recipe.method, save="full", evaluate=False, lm_eval=None,
                               search=None, resume=False, insight=InsightConfig(), overrides={},
                               save_intermediates=False)


def preflighted(method: Merges, where: str) -> dict[str, Any]:
    """``method.preflight()`` (its models resolved and checked, no weights), errors naming the merge."""
    try:
        return method.preflight()
    except LLMMergingError as exc:
        raise type(exc)(f"{where}: {exc}") from None


def saved_dtype(method: Merges) -> torch.dtype:
    """The dtype a merge's result is written in: the recipe's ``out_dtype``, else the merge's dtype."""
    recipe = method.recipe
    return getattr(torch, recipe.out_dtype) if recipe is not None and recipe.out_dtype else method.torch_dtype()


def peak_bytes(chain: MergeChain, sizes: dict[str, int]) -> int:
    """The most bytes of intermediate merges that exist at once when each is removed after its last reader."""
    last = chain.last_use()
    live: dict[str, int] = {}
    peak = 0
    for i, step in enumerate(chain.steps[:-1]):
        peak = max(peak, sum(live.values()) + sizes[step.name])
        live[step.name] = sizes[step.name]
        for name in [n for n in live if last.get(n) == i]:
            del live[name]
    return peak


def fits_in_memory(intermediates: int, largest_load: int) -> bool:
    """Whether ``intermediates`` bytes fit the RAM-backed folder, and together with the largest model one
    merge loads, ``MEMORY_SHARE`` of the available memory."""
    if not MEMORY_DIR.is_dir():
        return False
    try:
        free = shutil.disk_usage(MEMORY_DIR).free
    except OSError:
        return False
    return intermediates <= free and intermediates + largest_load <= MEMORY_SHARE * available_bytes(torch.device("cpu"))


def scratch_parent() -> str:
    """Where the scratch folder of ``disk`` intermediates goes (``$TMPDIR``)."""
    return tempfile.gettempdir()


def mark_merges(models: dict[str, Any], paths: dict[str, str]) -> None:
    """Name the intermediate merges among a merge's ``models`` (report.json): ``chain_merge``."""
    by_path = {Path(p).resolve(): name for name, p in paths.items()}
    for entry in [models.get("base") or {}, *(models.get("experts") or [])]:
        name = by_path.get(Path(entry.get("path") or "").resolve()) if entry.get("path") else None
        if name is not None:
            entry["chain_merge"] = name
