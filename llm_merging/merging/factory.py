"""Build a configured merge method: create the registered class by name, then apply a run's settings
(models, device, dtype, seed, calibration data, hyperparameters) to it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from llm_merging.core.devices import check_device
from llm_merging.core.errors import ConfigError
from llm_merging.merging import get_method_class
from llm_merging.merging.hparams import COMMON
from llm_merging.merging.Merges import Merges
from llm_merging.model import tiny

logger = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    """Unlabeled prompts of data-aware methods (``--calibration-data``, ``--calibration-examples``)."""

    data: list[str] | None = None  # files; ``I=FILE`` gives expert I its own prompts
    examples: int | None = None  # prompts per expert (None: the method's, 256)

    @property
    def given(self) -> bool:
        return bool(self.data) or self.examples is not None


@dataclass
class MethodOptions:
    """What a run sets on a method instance (the CLI's model, device and hyperparameter flags)."""

    tiny: bool = False  # offline tiny twins of the method's models
    base_model: str | None = None
    models: list[str] | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int | None = None  # None: the recipe's, else 0
    progress: bool = True
    overrides: dict[str, str] = field(default_factory=dict)  # --set KEY=VALUE, as text
    mc_scoring: str | None = None
    adapter_rank: int | None = None
    adapter_energy: float | None = None
    adapter_max_rank: int | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


def instantiate(name: str) -> Merges:
    """Create the method registered as ``name`` (kit classes take ``name``; very old ones take nothing)."""
    cls = get_method_class(name)
    name = name.rpartition(":")[2]  # "package.module:Class" runs an unregistered class as "Class"
    try:
        method = cls(name)
    except TypeError:
        method = cls()
    if getattr(method, "name", None) is None:
        method.name = name
    ensure_our_attributes(method)
    return method


def ensure_our_attributes(method: Merges) -> None:
    """Kit classes may skip our base ``__init__`` extras (e.g. a class with its own ``__init__`` that
    never calls ``super().__init__``); give them defaults."""
    defaults = Merges(method.name)
    for key, value in vars(defaults).items():
        if not hasattr(method, key):
            setattr(method, key, value)
    for key, value in defaults.hparams.items():
        method.hparams.setdefault(key, value)


def apply_tiny(method: Merges) -> None:
    """Swap the method's models for offline tiny twins (same architecture, one per listed expert)."""
    arch = method.architecture if method.architecture in ("decoder", "encoder_decoder") else "decoder"
    n = max(len(method.model_refs()), 1)
    low, high = method.expert_count
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


def configure(method: Merges, options: MethodOptions) -> None:
    """Apply a run's settings (models, device, dtype, seed, calibration, hyperparameters) to ``method``."""
    if options.tiny:
        apply_tiny(method)
    if options.base_model:
        method.base_model_name = options.base_model
        method.base_model_revision_id = None
    if options.models:
        method.list_models = list(options.models)
        if method.uses_engine():  # the engine takes adapters and full models alike: detect each
            method.is_peft = None
        optional = method.base_optional
        if not options.base_model and not options.tiny and (optional or method.uses_engine()):
            # --models without --base-model: a merge without a base, the first model the template
            if not optional:
                reason = method.needs_base_because
                raise ConfigError(f"merge method '{method.name}' needs a base model (--base-model): {reason}")
            method.base_free = True
            method.base_model_name = str(options.models[0])
            method.base_model_revision_id = None
            method.is_peft = None
    if options.device:
        method.device = check_device(options.device)
    elif method.device is not None and str(method.device) != "auto":
        try:
            check_device(str(method.device))
        except ConfigError:  # e.g. a kit class hard-coding "cuda", run on a machine without GPU
            logger.warning("method '%s' asks for device %s, which this machine lacks; using the CPU",
                           method.name, method.device)
            method.device = "cpu"
    recipe = method.recipe
    if options.dtype:
        method.dtype = options.dtype
    elif recipe is not None and recipe.dtype:
        method.dtype = recipe.dtype
    if options.seed is not None or recipe is None or recipe.seed is None:
        method.seed = 0 if options.seed is None else options.seed
    else:
        method.seed = recipe.seed
    method.progress = options.progress
    if method.needs_calibration:  # data-aware methods (merging/data_aware.py)
        cal = options.calibration
        method.calibration_files = list(cal.data or (tiny.calibration_files() if options.tiny else []))
        if cal.examples is not None:
            method.calibration_examples = cal.examples
    method.set_hyperparameters(options.overrides, from_text=True)  # also takes mc_scoring / adapter_rank aliases
    for key in ("mc_scoring", "adapter_rank", "adapter_energy", "adapter_max_rank"):
        if getattr(options, key) is not None:
            setattr(method, key, COMMON[key].validate(key, getattr(options, key)))
