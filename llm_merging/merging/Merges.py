"""``Merges``: the starter-kit compatible base class of every merge method.

A class written for the competition starter kit (either era) runs unchanged on it: same attributes
(``list_models``, ``base_model_name``, ``is_peft``, ``architecture``, ``loaded_models``, ``merged_model``,
...) and methods (``_load_huggingface_models_and_configs``, ``_load_base_model``, ``_load_tokenizer``,
``predict_multiple_choice``, ``generate``, ``save_model``, ...).

New methods need less: declare ``hyperparameters`` and implement ``merge_tensor``; the default
``merge()`` then streams every parameter through the merge engine (exact LoRA ΔW, full fine-tunes
read tensor by tensor, math on the GPU when there is one) and writes the result into the base model.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from llm_merging.core.errors import CheckpointError, ConfigError, ModelNotFoundError, first_line
from llm_merging.core.io import scratch_directory
from llm_merging.merging import settings
from llm_merging.merging.hparams import COMMON, MODIFIERS, Param
from llm_merging.model import auto_model_class, decoder_functions, encoder_decoder_functions, engine, tokenizer_union
from llm_merging.model.refs import ModelRef, hf_token
from llm_merging.model.save import save_state_dict
from llm_merging.ops.lines import lines_scale

logger = logging.getLogger(__name__)

ARCHITECTURES = ("decoder", "encoder_decoder")


class DeltaSink(Protocol):
    """``Merges.delta_sink``: sees every merged task vector (the runner's ``model.save.AdapterWriter`` for
    ``--save adapter``). ``bind`` gives it the model and the experts before the merge runs."""

    def bind(self, model: torch.nn.Module, experts: list) -> Any: ...

    def __call__(self, name: str, delta: torch.Tensor) -> None: ...


class Merges(object):
    """Base class of merge methods (starter-kit surface plus hyperparameters and the engine hook)."""

    #: one-line description shown by ``--list`` (default: first line of the class docstring)
    description: ClassVar[str] = ""
    #: hyperparameters of the method, settable with ``--set KEY=VALUE``
    hyperparameters: ClassVar[dict[str, Param]] = {}
    #: how many expert models the method takes: (at least, at most or None); checked in preflight
    expert_count: ClassVar[tuple[int, int | None]] = (1, None)
    #: data-aware methods read unlabeled prompts (``calibration_files``) before merging
    needs_calibration: ClassVar[bool] = False
    #: post-pass modifiers (``hparams.MODIFIERS``) that the method is itself, each with the hyperparameters
    #: that set it instead: not among its hyperparameters, refused through ``--set`` (``lines``: alpha, beta)
    builtin_modifiers: ClassVar[dict[str, str]] = {}
    #: the method's definition needs no base model (model soups, Karcher mean, NuSLERP, Multi-SLERP,
    #: passthrough): a run without one (``base_free``) merges the models' own weights, the first model
    #: serving as the template (config, tokenizer, architecture, tensors no model changes)
    base_optional: ClassVar[bool] = False
    #: why the method needs a base model (the end of the one-line error of a run without one)
    needs_base_because: ClassVar[str] = "it merges task vectors (model − base)"

    # What the pipeline reads and sets on a method (declared here so that it never probes for them):
    #   set before preflight: ``should_stop`` (budget spent?), ``tokenizer_optional`` (``--no-eval``),
    #   ``progress``, ``calibration_files`` / ``calibration_examples``, ``recipe`` (``apply_recipe``),
    #   ``delta_sink`` (``--save adapter``), ``save_while_merging`` (write the model while merging);
    #   read after the merge: ``merge_stats``, ``load_seconds``, ``stream_writer``, ``output_tokenizer``,
    #   ``tokenizer_note``, ``vocabulary_report``, ``calibration_report()``.

    def __init__(self, name: str | None = None) -> None:
        self.name = name

        self.list_models: list | None = None
        self.loaded_models: dict | None = None
        self.loaded_configs: dict | None = None
        self.base_model = None
        self.tokenizer = None
        self.input_tokenizer = None
        self.target_tokenizer = None

        self.base_model_name: str | None = None
        self.base_model_revision_id: str | None = None
        # None: detect adapters by adapter_config.json (entry-points-era classes never set it)
        self.is_peft: bool | None = None

        self.max_seq_len: int | None = None
        self.max_gen_len: int | None = None

        self.device = None
        self.architecture: str | None = None

        self.merged_model = None

        # Our additions (never required from participant classes).
        self.dtype: str = "auto"
        self.seed: int = 0
        self.progress: bool = True
        self.hparams: dict[str, Any] = {k: copy.deepcopy(p.default) for k, p in self.all_hyperparameters().items()}
        for key in MODIFIERS:  # post-pass modifiers (lines) enter hparams only once set: runs without them are unchanged
            self.hparams.pop(key, None)
        self.experts: list = []
        self.merge_stats: dict[str, Any] = {}
        self.delta_sink: DeltaSink | None = None  # the runner's adapter writer for --save adapter
        # the runner's --no-eval --save full hook: model -> a StreamingSave the engine writes into, or None
        self.save_while_merging = None
        self.stream_writer = None
        self.mc_scoring = "exact"  # run option (--mc-scoring; --set mc_scoring= is an alias)
        self.adapter_rank: int | None = None  # run option (--adapter-rank; --set adapter_rank= is an alias)
        self.adapter_energy: float | None = None  # run option (--adapter-energy; alias --set adapter_energy=)
        self.adapter_max_rank: int | None = None  # run option (--adapter-max-rank; alias --set adapter_max_rank=)
        self.should_stop = None  # set by the runner: True once the wall-clock budget is spent
        self.load_seconds = 0.0
        self.layout = None  # depth and slice of each tensor (settings.Layout), set in preflight and merge
        self.slice_lengths = None  # layers per output slice of a recipe (None: one slice)
        self.tokenizer_optional = False  # set by the runner for --no-eval: a base without tokenizer still merges
        self.tokenizer_note: str | None = None  # why no tokenizer was loaded (then none is saved)
        self.recipe = None  # the merging.recipe.Recipe this method was built from (--recipe), if any
        # no base model given: the first of list_models is base_model_name, the template (base_optional methods)
        self.base_free = False
        self.recipe_hparams: dict[str, Any] | None = None  # hyperparameters as the recipe set them
        self.output_tokenizer = None  # a recipe's output tokenizer (tokenizer_source / chat_template)
        self.vocabulary_report: dict[str, Any] | None = None  # output vocabulary, or vocabulary mismatches
        self.calibration_files: list[str] | None = None  # --calibration-data entries (data-aware methods)
        self.calibration_examples: int | None = None  # --calibration-examples (None: the method's default)

    # ------------------------------------------------------------------ kit surface
    def get_name(self) -> str | None:
        return self.name

    def scratch_space(self) -> list[tuple[str, int, str]]:
        """Temporary disk the merge needs besides its outputs, as ``(folder, bytes, what)`` (checked against
        the free space in preflight, before any weight is loaded); none by default."""
        return []

    def calibration_report(self) -> dict[str, Any]:
        """report.json ``calibration`` of a data-aware method (prompts, passes, seconds); {} otherwise."""
        return {}

    def get_model_config(self):
        """The kit declared this hook without implementing it; we return the base model's config."""
        if self.base_model is not None:
            return self.base_model.config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.base_ref().resolve(hf_token())))

    def _load_base_model(self) -> None:
        """Load the base model (resolved reference, chosen dtype) onto ``self.device``."""
        self._check_architecture()
        path = self.base_ref().resolve(hf_token())
        loader = auto_model_class(self.architecture)
        device = self.torch_device()
        kwargs: dict[str, Any] = {"dtype": self.torch_dtype()}
        spread = self.device in (None, "auto") and torch.cuda.device_count() > 1
        if spread:  # accelerate's device map over every GPU (never CPU or disk offload: weights stay real)
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        elif device.type != "cpu":
            kwargs["device_map"] = {"": str(device)}
        t0 = time.time()
        try:
            model = loader.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load base model '{self.base_model_name}' from {path}: {first_line(exc)}") from None
        offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if offloaded:
            raise CheckpointError(
                f"base model '{self.base_model_name}' does not fit the GPUs ({len(offloaded)} tensors offloaded, "
                f"e.g. {offloaded[0]}); use --dtype bfloat16 or a machine with more GPU memory"
            )
        self.base_model = (model if spread else model.to(device)).eval()
        self.load_seconds += time.time() - t0

    def _load_tokenizer(self) -> None:
        """Load tokenizers as the kit does (decoder: left-padded input, right-padded target with EOS, no BOS)."""
        from transformers import AutoTokenizer

        self._check_architecture()
        # a recipe's output tokenizer, while `_recipe_tokenizer` loads it; else the base model's
        path = getattr(self, "_tokenizer_path", None) or str(self.base_ref().resolve(hf_token()))

        def load():
            kwargs: dict[str, Any] = {"legacy": False}
            if self.max_seq_len is not None:
                kwargs["model_max_length"] = self.max_seq_len
            try:
                return AutoTokenizer.from_pretrained(path, **kwargs)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(
                    f"cannot load the tokenizer of base model '{self.base_model_name}' from {path}: {first_line(exc)}"
                ) from None

        if self.architecture == "encoder_decoder":
            if self.tokenizer is None:
                self.tokenizer = load()
        elif self.input_tokenizer is None or self.target_tokenizer is None:
            self.input_tokenizer = load()
            self.target_tokenizer = copy.deepcopy(self.input_tokenizer)
            for tok in (self.input_tokenizer, self.target_tokenizer):
                if tok.pad_token_id is None:
                    tok.pad_token_id = tok.eos_token_id
            self.input_tokenizer.padding_side = "left"
            self.target_tokenizer.padding_side = "right"
            self.target_tokenizer.add_bos_token = False
            self.target_tokenizer.add_eos_token = True

    def _load_tokenizer_if_any(self) -> None:
        """``_load_tokenizer``; when ``tokenizer_optional`` (nothing to evaluate) a base without tokenizer
        files is merged and saved without one, as mergekit does, and ``tokenizer_note`` says so."""
        try:
            self._load_tokenizer()
        except ModelNotFoundError as exc:
            if not self.tokenizer_optional:
                raise
            self.tokenizer_note = f"no tokenizer copied: {exc}"
            logger.warning("%s", self.tokenizer_note)

    def predict_multiple_choice(self, batch: dict):
        """Score every answer choice; return ``(predicted_choice[B], scores[B, n_choices])``."""
        assert self.base_model is not None, "the model must be merged (or loaded) before evaluation"
        scoring = self.mc_scoring
        if self.architecture == "encoder_decoder":
            return encoder_decoder_functions.predict_multiple_choice(self.base_model, self.tokenizer, batch)
        if self.architecture == "decoder":
            return decoder_functions.predict_multiple_choice(
                self.base_model, self.input_tokenizer, self.target_tokenizer, batch, scoring=scoring
            )
        raise NotImplementedError(f"Architecture not implemented {self.architecture}")

    def generate(self, batch: dict):
        """Greedy generation of ``max_gen_len`` new tokens; return ``(ids, texts)``."""
        assert self.base_model is not None, "the model must be merged (or loaded) before evaluation"
        max_gen_len = self.max_gen_len or 64
        if self.architecture == "encoder_decoder":
            return encoder_decoder_functions.generate(self.base_model, self.tokenizer, batch, max_gen_len)
        if self.architecture == "decoder":
            return decoder_functions.generate(
                self.base_model, self.input_tokenizer, self.target_tokenizer, batch, max_gen_len
            )
        raise NotImplementedError(f"Architecture not implemented {self.architecture}")

    def _load_huggingface_models_and_configs(self) -> None:
        """Kit behaviour: fill ``loaded_models`` / ``loaded_configs`` with every expert, whole.

        Adapters: ``load_peft_weights`` dicts and ``PeftConfig``; full models: state dicts and ``AutoConfig``.
        Prefer the engine (``merge_tensor``) for large models: it never holds whole experts.
        """
        from peft import PeftConfig, load_peft_weights
        from transformers import AutoConfig

        refs = self.model_refs()
        if not refs:
            raise ConfigError(f"method '{self.name}': list_models must include at least 1 model")
        if self.loaded_models is None:
            self.loaded_models = {}
        if self.loaded_configs is None:
            self.loaded_configs = {}
        parameter_names = None
        t0 = time.time()
        for ref in refs:
            path = str(ref.resolve(hf_token()))
            if self.expert_is_adapter(ref):
                params = load_peft_weights(path, device="cpu")
                config = PeftConfig.from_pretrained(path)
            else:
                params = auto_model_class(self.architecture).from_pretrained(path, dtype=self.torch_dtype()).state_dict()
                config = AutoConfig.from_pretrained(path)
            if parameter_names is None:
                parameter_names = set(params)
            elif parameter_names != set(params):
                logger.warning("parameters in %s do not match %s", ref.id, refs[0].id)
            self.loaded_models[ref.id] = params
            self.loaded_configs[ref.id] = config
        self.load_seconds += time.time() - t0

    def merge(self):
        """Merge the experts into the base model with the engine and ``merge_tensor``."""
        if type(self).merge_tensor is Merges.merge_tensor:
            raise NotImplementedError(f"merge method '{self.name}' must implement merge() or merge_tensor()")
        plan = self._recipe_tokenizer()  # before any weights: a bad tokenizer setting fails fast
        if plan is not None and self.delta_sink is not None and not plan.is_identity:
            raise ConfigError("--save adapter cannot change the vocabulary (the recipe's tokenizer); use --save full")
        self._load_base_model()
        self._load_tokenizer_if_any()
        t0 = time.time()
        self.experts = self.open_experts(engine.base_param_shapes(self.base_model))
        self.load_seconds += time.time() - t0
        if self.delta_sink is not None:  # the adapter writer needs the model and experts
            self.delta_sink.bind(self.base_model, self.experts)
        self.layout = settings.Layout([n for n, _ in self.base_model.named_parameters()],
                                      self.slice_lengths, engine.tensor_aliases(self.base_model))
        writer = None
        if self.save_while_merging is not None and plan is None and self.delta_sink is None:
            writer = self.save_while_merging(self.base_model)  # None where the model must be saved whole
        try:
            self.merge_stats = engine.merge_into(
                self.base_model, self.experts, self.merge_resolved, progress=self.progress, label=str(self.name),
                delta_sink=self.delta_sink, base_dir=self.base_ref().local_path, should_stop=self.should_stop,
                tokenizer_plan=plan, merge_chunks=self.merge_chunks_resolved, writer=writer,
                split_experts=not self.needs_calibration,  # data-aware statistics are kept per parameter
            )
        except BaseException as exc:
            if writer is not None:
                writer.abort(exc)  # removed; kept for --resume when a signal interrupted it
            raise
        recipe_tok = (self.recipe.tokenizer if self.recipe is not None else None) or {}
        self.vocabulary_report = tokenizer_union.vocabulary_report(plan, self.experts, recipe_tok.get("source"),
                                                                   self.merge_stats.pop("vocabulary", None))
        self.stream_writer = writer
        # written while merging: the loaded model still holds θ₀, and the merged one exists only on disk
        self.merged_model = None if writer is not None else self.base_model
        return self.base_model

    def _recipe_tokenizer(self):
        """A recipe's ``tokenizer_source`` / ``tokenizer:`` / ``chat_template``: build the output tokenizer
        (`tokenizer_union.recipe_tokenizer`), keep it as ``output_tokenizer`` (what is saved) and make it
        the tokenizer of the merged model (evaluation included); return its plan (None: no tokenizer setting)."""
        recipe = self.recipe
        self.output_tokenizer = None
        if recipe is None or (recipe.tokenizer is None and not recipe.chat_template):
            return None
        token = hf_token()
        base_path = self.base_ref().resolve(token)
        refs = self.model_refs()
        paths = [r.resolve(token) for r in refs]
        known = {str(self.base_model_name): base_path, self.base_ref().id: base_path}
        for ref, path in zip(refs, paths):
            known.setdefault(str(ref), path)
            known.setdefault(ref.id, path)

        def local(value):
            if isinstance(value, str) and value in known:
                return str(known[value])
            return value

        plan, tok = tokenizer_union.recipe_tokenizer(recipe.tokenizer, recipe.chat_template, base_path, paths, local)
        self.output_tokenizer = tok
        if plan is not None:  # evaluation and generation use the output tokenizer (padded as the kit's)
            self.tokenizer = self.input_tokenizer = self.target_tokenizer = None
            with scratch_directory("tok") as tmp:
                plan.save(tmp)
                self._tokenizer_path = tmp
                try:
                    self._load_tokenizer()
                finally:
                    self._tokenizer_path = None
        return plan

    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """Return the merged task vector of parameter ``name`` (float32, same shape as ``base``).

        ``task_vectors[i]`` is expert i's τ = θᵢ − θ₀ for this parameter (zeros where the expert does
        not touch it); ``self.experts[i]`` gives access to the expert itself (e.g. LoRA factors).
        """
        raise NotImplementedError

    def merge_chunks(self, name: str, read, numel: int, n_models: int):
        """The chunked form of :meth:`merge_tensor`: an iterator of ``(start, stop, merged)`` over the flat
        entries of parameter ``name`` (``read(start, stop)`` gives θ₀ and the task vectors there; see
        :mod:`llm_merging.ops.streaming`), equal bit for bit to ``merge_tensor``'s flat result; None (the
        default) where the method has none, and the engine merges whole tensors."""
        return None

    def merge_chunks_resolved(self, name: str, read, numel: int, n_models: int):
        """``merge_chunks`` with this tensor's resolved ``self.hparams`` while it runs (what the engine
        calls). None also where a subclass overrides ``merge_tensor`` below the class that defines the
        chunked form (that form would not compute the override)."""
        if not _chunked_form_current(type(self)):
            return None
        values = self.resolve_hparams(name, n_models)
        raw, self.hparams = self.hparams, values
        try:
            chunks = self.merge_chunks(name, read, numel, n_models)
            # the LiNeS post-pass: a per-tensor scalar, applied chunk by chunk
            factor = None if chunks is None else self.lines_factor(name, n_models)
        finally:
            self.hparams = raw
        if chunks is None:
            return None
        chunks = self._with_hparams(values, iter(chunks))
        return chunks if factor is None or factor == 1.0 else ((a, b, m * factor) for a, b, m in chunks)

    def _with_hparams(self, values: dict[str, Any], chunks):
        while True:
            raw, self.hparams = self.hparams, values
            try:
                item = next(chunks)
            except StopIteration:
                return
            finally:
                self.hparams = raw
            yield item

    def save_model(self, output_dir: str) -> None:
        """Kit output: the merged weights as ``<output_dir>/safetensor.pt`` (safetensors format)."""
        assert self.merged_model is not None, "Merged model is empty"
        state = self.merged_model.state_dict() if isinstance(self.merged_model, torch.nn.Module) else self.merged_model
        assert len(state) > 0, "Merged model is empty"
        save_state_dict(state, os.path.join(output_dir, "safetensor.pt"))

    # ------------------------------------------------------------------ our layer
    @classmethod
    def uses_engine(cls) -> bool:
        """True when the class merges through the engine (``merge_tensor``), not its own ``merge()``
        (a ``merge()`` that wraps the engine's and is marked ``engine_merge = True`` counts as the engine)."""
        return cls.merge is Merges.merge or getattr(cls.merge, "engine_merge", False) is True

    @classmethod
    def all_hyperparameters(cls) -> dict[str, Param]:
        specs = dict(cls.hyperparameters)
        if cls.uses_engine():  # the engine's post-pass modifiers (hparams.MODIFIERS: lines) apply to every method
            for key in MODIFIERS:
                if key not in cls.builtin_modifiers:
                    specs.setdefault(key, COMMON[key])
        return specs

    @classmethod
    def get_description(cls) -> str:
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.__name__

    def set_hyperparameters(self, values: dict[str, Any], *, from_text: bool = False) -> None:
        """Set and validate hyperparameters (``from_text``: values are ``--set`` strings)."""
        specs = self.all_hyperparameters()
        for key, value in values.items():
            if key in self.builtin_modifiers:
                raise ConfigError(f"hyperparameter '{key}': method '{self.name}' applies it by itself; set "
                                  f"{self.builtin_modifiers[key]} instead")
            if key in MODIFIERS and key not in specs:
                raise ConfigError(f"hyperparameter '{key}' is a post-pass of the merge engine; method '{self.name}' "
                                  "merges with its own merge()")
            if key in COMMON and key not in specs:  # run options, accepted through --set as aliases
                option = COMMON[key]
                setattr(self, key, option.validate(key, option.parse(key, value) if from_text else value))
                continue
            if key not in specs:
                known = ", ".join(sorted(specs)) or "none"
                raise ConfigError(f"unknown hyperparameter '{key}' for method '{self.name}' (known: {known})")
            if from_text:
                value = specs[key].parse(key, value)
            self.hparams[key] = value
        self.validate_hyperparameters()

    def validate_hyperparameters(self) -> None:
        """Check every value each hyperparameter can take (per tensor too), then the method's own rules
        (:meth:`check_values`) wherever the values are the same for every tensor; per-tensor values are
        checked tensor by tensor in preflight (:meth:`check_all_tensors`)."""
        n = len(self.model_refs()) if self.list_models else None
        specs = self.all_hyperparameters()
        for key, value in list(self.hparams.items()):
            if key in specs:
                self.hparams[key] = specs[key].validate(key, value, n)
        if n and not any(settings.is_structured(v) for v in self.hparams.values()):
            self.check_values(self.resolve_hparams("", n))

    def check_values(self, values: dict[str, Any]) -> None:
        """Method-specific checks of resolved values (per-model entries are lists); raise ConfigError."""

    def resolve_hparams(self, name: str, n_models: int | None = None) -> dict[str, Any]:
        """The hyperparameters for tensor ``name`` as plain values: gradients, filters and slice/model
        precedence resolved (:mod:`settings`), per-model entries as one value per model."""
        n = len(self.model_refs()) if n_models is None else n_models
        pos = self.layout.position(name) if self.layout is not None else settings.Position(name)
        specs = self.all_hyperparameters()
        out: dict[str, Any] = {}
        for key, value in self.hparams.items():
            spec = specs.get(key)
            if spec is not None and spec.per_model:
                items = list(value) if isinstance(value, (list, tuple)) else [value] * n
                default = spec.default if isinstance(spec.default, list) else [spec.default] * len(items)
                out[key] = [_resolved(v, pos, default[i] if i < len(default) else spec.default)
                            for i, v in enumerate(items)]
            else:
                out[key] = _resolved(value, pos, spec.default if spec is not None else None)
        return out

    def merge_resolved(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """``merge_tensor`` with ``self.hparams`` holding this tensor's resolved values (what the engine calls)."""
        raw = self.hparams
        self.hparams = self.resolve_hparams(name, len(task_vectors))
        try:
            merged = self.merge_tensor(name, base, task_vectors)
            factor = self.lines_factor(name, len(task_vectors))  # the LiNeS post-pass (None: off)
        finally:
            self.hparams = raw
        return merged if factor is None or factor == 1.0 else merged * factor

    def lines_coefficients(self, n_models: int) -> tuple[float, float] | None:
        """(α, β) of the LiNeS post-pass from this tensor's resolved ``self.hparams``, or None when it is off:
        the ``lines`` modifier by default (``Lines``: its own alpha and beta)."""
        ab = self.hparams.get("lines")
        return None if ab is None else (ab[0], ab[1])

    def lines_factor(self, name: str, n_models: int) -> float | None:
        """The LiNeS post-pass factor λ(l) = α + β·l/(L−1) of tensor ``name`` (block l of the L blocks of its
        stack, ``settings.Layout.depth``; α outside the blocks, as the reference ``LiNeS_scaling``), or None
        when the post-pass is off (:meth:`lines_coefficients`); ``self.hparams`` holds the tensor's resolved
        values. The engine paths (whole tensors, chunks, a search's candidates) multiply the method's merged
        task vector by it: θ = θ₀ + λ(l)·(θ_merged − θ₀)."""
        ab = self.lines_coefficients(n_models)
        if ab is None:
            return None
        if self.layout is None:
            raise ConfigError(f"method '{self.name}': lines needs the model's layer layout (method.layout, "
                              "a settings.Layout of its parameter names)")
        depth = self.layout.depth(name)
        return lines_scale(*(depth or (None, None)), ab[0], ab[1])

    def check_all_tensors(self, names) -> int:
        """Preflight: resolve the hyperparameters of every tensor in ``names`` and check them (ranges and
        :meth:`check_values`); return the number of distinct value sets checked."""
        self.layout = settings.Layout(list(names), self.slice_lengths)
        if not any(settings.is_structured(v) for v in self.hparams.values()):
            return 1
        specs = self.all_hyperparameters()
        n = len(self.model_refs())
        seen = set()
        for name in names:
            values = self.resolve_hparams(name, n)
            key = repr(sorted(values.items()))
            if key in seen:
                continue
            seen.add(key)
            for k, v in values.items():
                if k in specs:
                    try:
                        specs[k].validate(k, v, n)
                    except ConfigError as exc:
                        raise ConfigError(f"{exc} (resolved for tensor '{name}')") from None
            try:
                self.check_values(values)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (resolved for tensor '{name}')") from None
        return len(seen)

    def model_refs(self) -> list[ModelRef]:
        """``list_models`` as references (tuples ``(id, revision)`` or bare strings)."""
        if self.list_models is None:
            return []
        if isinstance(self.list_models, str) or (
            isinstance(self.list_models, tuple) and not any(isinstance(x, (tuple, list)) for x in self.list_models)
        ):
            items = [self.list_models]  # one model: "id" or ("id", revision)
        else:
            items = list(self.list_models)
        cache = getattr(self, "_ref_cache", {})
        refs = []
        for item in items:
            key = repr(item)
            if key not in cache:
                cache[key] = ModelRef.parse(item)
            refs.append(cache[key])
        self._ref_cache = cache
        return refs

    def base_ref(self) -> ModelRef:
        if not self.base_model_name:
            raise ConfigError(f"method '{self.name}' sets no base_model_name")
        key = (str(self.base_model_name), self.base_model_revision_id)
        if getattr(self, "_base_ref_key", None) != key:
            ref = ModelRef.parse(self.base_model_name)
            if self.base_model_revision_id and not ref.revision:
                ref.revision = self.base_model_revision_id
            self._base_ref, self._base_ref_key = ref, key
        return self._base_ref

    def check_base_free(self) -> None:
        """A run without a base model (``base_free``): the method must be ``base_optional``, the template
        (``base_model_name``) the first of the models, and every model a full model (no LoRA adapter)."""
        if not type(self).base_optional:
            raise ConfigError(f"merge method '{self.name}' needs a base model (--base-model, or base_model in a "
                              f"recipe): {self.needs_base_because}")
        refs = self.model_refs()
        if not refs or (refs[0].id, refs[0].revision) != (self.base_ref().id, self.base_ref().revision):
            raise ConfigError(f"method '{self.name}': a merge without a base model uses its first model as the "
                              f"template, but base_model_name is '{self.base_model_name}'")
        for ref in refs:
            if self.expert_is_adapter(ref):
                raise ConfigError(f"model '{ref}' is a LoRA adapter, a change to its base model: a merge without a "
                                  "base model takes full models; give the base (--base-model, or base_model in a recipe)")

    def open_experts(self, shapes: dict[str, tuple]) -> list:
        """This method's experts opened lazily (``engine.open_experts``) and bound to ``shapes``."""
        models = [(ref, self.expert_is_adapter(ref)) for ref in self.model_refs()]
        reindexed = self.recipe is not None and self.recipe.tokenizer is not None
        return engine.open_experts(models, shapes, base_path=self.base_ref().resolve(hf_token()), vocab_reindexed=reindexed)

    def expert_is_adapter(self, ref: ModelRef) -> bool:
        """``is_peft`` when the class sets it, else whether the resolved directory holds an adapter."""
        ref.resolve(hf_token())
        if self.is_peft is None:
            return ref.is_adapter
        return bool(self.is_peft)

    def preflight(self) -> dict[str, Any]:
        """Resolve every reference and check it before any weights are loaded; return what was found."""
        token = hf_token()
        if self.base_free:
            self.check_base_free()
        base = self.base_ref()
        base_path = base.resolve(token)
        if not (base_path / "config.json").is_file():
            raise ModelNotFoundError(f"base model '{base}' at {base_path} has no config.json")
        self._match_architecture(base, base_path)
        self._check_architecture()
        experts = []
        for ref in self.model_refs():
            path = ref.resolve(token)
            adapter = self.expert_is_adapter(ref)
            if adapter and not ref.is_adapter:
                raise ModelNotFoundError(f"model '{ref}' at {path} is not a PEFT adapter (no adapter_config.json)")
            if not adapter and not (path / "config.json").is_file():
                raise ModelNotFoundError(f"model '{ref}' at {path} has no config.json (neither model nor adapter)")
            experts.append({"id": ref.id, "revision": ref.revision, "resolved_revision": _snapshot_commit(path),
                            "path": str(path), "kind": "lora" if adapter else "full"})
        self.validate_hyperparameters()
        kinds = self._check_compatibility(base_path)
        for record, kind in zip(experts, kinds or []):
            record["kind"] = kind  # what the opened expert says it is (lora, full, or the base itself)
        base_info = {"id": base.id, "revision": base.revision, "resolved_revision": _snapshot_commit(base_path),
                     "path": str(base_path)}
        if self.base_free:  # no base model: the first model is the template of the output
            base_info["template"] = True
        return {"base": base_info, "experts": experts}

    def _match_architecture(self, base: ModelRef, base_path: Path) -> None:
        """Engine methods follow the base model (decoder or encoder-decoder); classes with their own
        ``merge()`` keep theirs, and a mismatch is a clear error instead of a failed load."""
        config = self._base_config(strict=True)
        actual = "encoder_decoder" if config.get("is_encoder_decoder") else "decoder"
        if self.uses_engine():
            self.architecture = actual
        elif self.architecture in ARCHITECTURES and self.architecture != actual:
            raise ConfigError(
                f"method '{self.name}' is written for a {self.architecture} model but base model '{base}' is {actual}"
            )

    def _check_compatibility(self, base_path: Path) -> list[str] | None:
        """Read only headers and configs: every expert must fit the base (shapes, modules in common).
        Returns each expert's ``kind``."""
        engine.check_base_files(base_path)
        shapes = engine.config_param_shapes(base_path, self.architecture)
        self.check_all_tensors(list(shapes))
        if not self.model_refs():
            return None
        experts = self.open_experts(shapes)
        for expert in experts:
            expert.close()
        return [expert.kind for expert in experts]

    def torch_device(self) -> torch.device:
        """The main device; ``auto`` is the (first) GPU when there is one, else the CPU. With several GPUs,
        ``auto`` spreads the base model over all of them (accelerate's device map)."""
        if self.device is None or self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        """``auto``: on GPU the base checkpoint's own half precision (float16 or bfloat16; bfloat16 when it
        is stored in float32), on CPU float32. Keeping an fp16 checkpoint in fp16 matters for merging: bf16
        rounds away a large part of small fine-tuning deltas."""
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if self.dtype in (None, "auto"):
            if self.torch_device().type != "cuda":
                return torch.float32
            config = self._base_config()
            stored = names.get(str(config.get("torch_dtype") or config.get("dtype")))
            if stored in (torch.float16, torch.bfloat16):
                return stored
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.dtype not in names:
            raise ConfigError(f"--dtype {self.dtype!r}: expected auto, float32, bfloat16 or float16")
        return names[self.dtype]

    def _base_config(self, strict: bool = False) -> dict:
        """The base model's config.json as a dict; {} when it is not resolved or unreadable, unless
        ``strict`` (then a ModelNotFoundError naming the file)."""
        import json

        path = self.base_ref().local_path if self.base_model_name else None
        try:
            return json.loads((path / "config.json").read_text(encoding="utf-8")) if path else {}
        except (OSError, ValueError) as exc:
            if strict:
                raise ModelNotFoundError(f"base model '{self.base_ref()}': cannot read {path / 'config.json'}: {exc}") from None
            return {}

    def _check_architecture(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"method '{self.name}': architecture must be 'decoder' or 'encoder_decoder', got {self.architecture!r}"
            )


def _owner(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in c.__dict__)


def _chunked_form_current(cls: type) -> bool:
    """Whether ``cls``'s chunked form (its ``merge_chunks``, or ``elementwise`` for the generic one) is
    declared at or below the class whose ``merge_tensor`` it stands for."""
    chunks = _owner(cls, "elementwise" if getattr(cls.merge_chunks, "elementwise_form", False) else "merge_chunks")
    return issubclass(chunks, _owner(cls, "merge_tensor"))


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot directory (``.../snapshots/<commit>``), else None."""
    return path.name if path.parent.name == "snapshots" else None


def _resolved(setting: Any, pos: settings.Position, default: Any) -> Any:
    if not settings.is_structured(setting):
        return setting
    value = settings.evaluate(setting, pos)
    return default if value is None else value
