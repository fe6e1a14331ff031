"""One run's configuration: `RunConfig`, with typed sections for search, lm-eval tasks, calibration data and
insight, built by the command line (or by library code) and checked by one `RunConfig.validate`."""
from __future__ import annotations

from dataclasses import dataclass, field

from llm_merging.core.choices import DATA_AWARE_METHODS, SAVE_MODES
from llm_merging.core.errors import ConfigError
from llm_merging.data import check_max_examples
from llm_merging.lm_eval_tasks import LMEvalConfig
from llm_merging.merging import get_method_class
from llm_merging.merging.factory import CalibrationConfig, MethodOptions
from llm_merging.search import SearchConfig

__all__ = ["RunConfig", "SearchConfig", "LMEvalConfig", "CalibrationConfig", "InsightConfig",
           "SAVE_MODES", "DEFAULT_DATASETS"]

#: the --save adapter run options (also --set aliases) and their flags
ADAPTER_OPTIONS = {"adapter_rank": "--adapter-rank", "adapter_energy": "--adapter-energy",
                   "adapter_max_rank": "--adapter-max-rank"}
NONE_TEXT = ("none", "null", "")

#: the starter kit's evaluation files, relative to the working directory
DEFAULT_DATASETS = ["data/validation/cosmos_qa.csv", "data/validation/xsum.csv"]


@dataclass
class InsightConfig:
    """``--analyze`` (task-vector analysis of the experts) and ``--baselines`` (base and experts alone)."""

    analyze: bool = False
    baselines: bool = False


@dataclass
class RunConfig:
    """Everything one run needs. The CLI fills it from its flags; library code builds it directly."""

    method: str  # a registered name, "package.module:Class", or "" with a recipe
    dataset_filepaths: list[str] | None = None
    eval_types: list[str] | None = None
    output_folder: str = "output"
    base_model: str | None = None
    models: list[str] | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # --set KEY=VALUE, as text
    time_budget: float = 3600.0
    batch_size: str | int = "auto"
    device: str | None = None
    dtype: str | None = None
    max_examples: int | None = None
    seed: int | None = None  # None: the recipe's, else 0
    recipe: str | None = None  # a mergekit-style YAML recipe (models, method, hyperparameters)
    tiny: bool = False
    evaluate: bool = True
    save: str = "full"
    mc_scoring: str | None = None  # None: the method's (exact)
    adapter_rank: int | None = None  # --save adapter's rank (None: sum of the input ranks)
    adapter_energy: float | None = None  # --save adapter: per module the smallest rank keeping this energy fraction
    adapter_max_rank: int | None = None  # --save adapter: no module's rank above this
    progress: bool = True
    argv: list[str] = field(default_factory=list)
    search: SearchConfig | None = None  # --search: the best values on held-out data before the merge
    lm_eval: LMEvalConfig | None = None  # --lm-eval: lm-evaluation-harness tasks on the merged model
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # data-aware methods' prompts
    insight: InsightConfig = field(default_factory=InsightConfig)
    resume: bool = False  # --resume without --search: continue a killed --no-eval --save full merge
    save_intermediates: bool = False  # a chained recipe: also save each merge before the final one

    def validate(self, processes: int = 1) -> None:
        """Check the configuration before anything is loaded (one-line ConfigError naming the option); the
        files, models and tasks it names are checked next, by the method's and each phase's preflight.
        ``processes``: how many processes run it together (``accelerate launch``)."""
        if not self.time_budget > 0:  # also rejects NaN
            raise ConfigError(f"--time-budget must be positive, got {self.time_budget}")
        if self.save not in SAVE_MODES:
            raise ConfigError(f"--save must be one of {', '.join(SAVE_MODES)}, got {self.save!r}")
        check_max_examples(self.max_examples, "--max-examples", minimum=1)
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.search is not None:
            self.search.validate()
        elif self.resume and (self.evaluate or self.save != "full"):
            raise ConfigError("--resume needs --search, or --no-eval --save full (to continue a merge that was "
                              "written while merging)")
        if processes > 1:
            for flag, on in (("--search", self.search is not None), ("--baselines", self.insight.baselines),
                             ("--analyze", self.insight.analyze)):
                if on:
                    hint = (" (several GPUs search together as workers sharing --search-storage)"
                            if flag == "--search" else "")
                    raise ConfigError(f"{flag} runs in one process, not {processes}: start it with "
                                      f"python llm_merging/main.py{hint}")
        if self.recipe and (self.models or self.base_model or self.tiny):
            raise ConfigError(f"--recipe {self.recipe}: the recipe names the models; drop --base-model/--models/--tiny")
        if self.lm_eval is not None and not self.evaluate:
            raise ConfigError("--lm-eval evaluates the merged model: drop --no-eval")
        if self.insight.baselines and not self.evaluate:
            raise ConfigError("--baselines evaluates the base and each expert: it cannot be combined with --no-eval")
        self.check_adapter_options()

    def check_adapter_options(self) -> None:
        """``--adapter-rank`` / ``--adapter-energy`` / ``--adapter-max-rank`` (or their ``--set`` aliases): only
        with ``--save adapter``; ranks ≥ 1; an energy in (0, 1]; a fixed rank with neither of the others."""
        given = {}
        for key, flag in ADAPTER_OPTIONS.items():
            value = getattr(self, key)
            if value is None and key in self.overrides and str(self.overrides[key]).strip().lower() not in NONE_TEXT:
                value, flag = self.overrides[key], f"--set {key}"
            if value is None:
                continue
            if self.save != "adapter":
                raise ConfigError(f"{flag} sets the adapter written by --save adapter; this run saves --save {self.save}")
            given[key] = (flag, value)
        for key in ("adapter_rank", "adapter_max_rank"):
            if key in given:
                flag, value = given[key]
                try:
                    ok = int(str(value)) == float(str(value)) and int(str(value)) >= 1
                except ValueError:
                    ok = False
                if not ok:
                    raise ConfigError(f"{flag} must be a positive integer, got {value}")
        if "adapter_energy" in given:
            flag, value = given["adapter_energy"]
            try:
                energy = float(str(value))
            except ValueError:
                energy = float("nan")
            if not 0 < energy <= 1:  # also rejects NaN
                raise ConfigError(f"{flag} must be in (0, 1] (the fraction of ΔW's squared Frobenius norm kept), "
                                  f"got {value}")
        if "adapter_rank" in given and "adapter_energy" in given:
            raise ConfigError(f"{given['adapter_rank'][0]} and {given['adapter_energy'][0]} both choose the adapter's "
                              "rank: give one (--adapter-max-rank caps --adapter-energy)")
        if "adapter_rank" in given and "adapter_max_rank" in given:
            raise ConfigError(f"{given['adapter_max_rank'][0]} caps --adapter-energy or the summed input ranks; "
                              f"{given['adapter_rank'][0]} fixes the rank: give one")

    def check_calibration(self, method_class: type) -> None:
        """``--calibration-data`` / ``--calibration-examples`` only with a data-aware method (or one to search)."""
        if not self.calibration.given:
            return
        names = list(self.search.methods or []) if self.search is not None else []
        classes = [method_class] + [get_method_class(n) for n in names]
        if not any(c.needs_calibration for c in classes):
            flag = "--calibration-data" if self.calibration.data else "--calibration-examples"
            raise ConfigError(f"{flag}: method '{self.method}' does not use calibration data "
                              f"(data-aware methods: {', '.join(DATA_AWARE_METHODS)})")

    def overrides_for(self, method_name: str, specs: dict) -> dict[str, str]:
        """The ``--set`` items meant for ``method_name`` (its hyperparameters ``specs``): with a search over
        several methods, ``M.KEY`` items for M only and a plain key for every method that declares it."""
        if self.search is None:
            return dict(self.overrides)
        methods = self.search.methods or [self.method]
        out = {}
        for key, value in self.overrides.items():
            method, dot, name = key.partition(".")
            if dot:
                if method not in methods:
                    raise ConfigError(f"--set {key}: method '{method}' is not one of -m {' '.join(methods)}")
                if method == method_name:
                    out[name] = value
            elif key in specs or len(methods) == 1:
                out[key] = value
        return out

    def method_options(self, method_name: str, specs: dict) -> MethodOptions:
        """The settings this run applies to an instance of ``method_name`` (hyperparameters ``specs``)."""
        return MethodOptions(
            tiny=self.tiny, base_model=self.base_model, models=self.models, device=self.device, dtype=self.dtype,
            seed=self.seed, progress=self.progress, overrides=self.overrides_for(method_name, specs),
            mc_scoring=self.mc_scoring, adapter_rank=self.adapter_rank, adapter_energy=self.adapter_energy,
            adapter_max_rank=self.adapter_max_rank, calibration=self.calibration)
