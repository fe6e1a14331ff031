"""``DataAwareMerge``: the base class of merge methods that look at activations on unlabeled prompts
(``regmean``, ``regmean_plus``, ``fisher``, ``adamerging``).

A subclass declares its ``hyperparameters`` (the fallback's ``weights``/``scale``/``fallback`` are
inherited) and implements

* ``covers(name) -> bool``: whether its statistic merges parameter ``name``;
* ``merge_covered(name, base, task_vectors) -> merged task vector`` for those parameters;
* optionally ``begin_pass()``: called before the first tensor of every merge pass (the engine's merge, and
  every candidate of ``--search``), e.g. to drop statistics that depend on the merged model.

Every other parameter goes through the data-free ``fallback`` method (default task arithmetic). The merge
runs through the engine (``merge_tensor``, tensors in the model's parameter order, each written into the
model right after it is merged), so ``--search`` and ``--save adapter`` work as for any engine method.

Inside ``merge_covered`` the method has the loaded model (``self.base_model``), tokenizer, experts
(``self.experts``) and calibration prompts (``self.calibration``); the helpers below run expert i's forward
passes on them (:meth:`expert_forward`, :meth:`calibration_batches`) and time them (``self.meter``).
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Sequence

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.merging import calibration as cal
from llm_merging.merging import get_method_class
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.merging.hparams import SCALE, WEIGHTS, Param
from llm_merging.model.engine import open_base_reader
from llm_merging.model.scoring import model_device, pad_id_of

logger = logging.getLogger(__name__)

FALLBACKS = ("task_arithmetic", "linear", "ties_merge")
FALLBACK = Param("task_arithmetic", "data-free method for the parameters the statistic does not cover "
                                    "(embeddings, norms, biases): task_arithmetic, linear or ties_merge (their defaults, "
                                    "with this method's weights and scale)", kind=str, choices=FALLBACKS)


class DataAwareMerge(TaskVectorMerge):
    """Base of data-aware methods: calibration prompts, expert forward passes, a data-free fallback."""

    #: overrides Merges' False: the method needs ``--calibration-data``
    needs_calibration: ClassVar[bool] = True
    #: expert forward passes need θ₀ of parameters already merged in this pass (:meth:`theta0`): keep a CPU
    #: copy of those the base files cannot serve (set False when only unmerged parameters are swapped)
    keeps_theta0: bool = True
    hyperparameters = {"weights": WEIGHTS, "scale": SCALE, "fallback": FALLBACK}

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.calibration_examples = cal.DEFAULT_EXAMPLES  # Merges' None ("the method's default") made explicit
        self.calibration_tokens_per_batch: int = cal.DEFAULT_TOKENS_PER_BATCH
        self.calibration: cal.Calibration | None = None
        self.meter = cal.Meter()
        self._fallbacks: dict[str, Any] = {}
        self._pass_names: list[str] = []
        self._done: set[str] = set()
        self._model_ref = None
        self._reader = None
        self._theta0_copies: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._encoded: dict[int, tuple[list[list[int]], int]] = {}

    # ------------------------------------------------------------------ subclass hooks
    def covers(self, name: str) -> bool:
        """Whether the statistic merges parameter ``name`` (else the fallback does)."""
        raise NotImplementedError

    def merge_covered(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector of a covered parameter (``self.hparams`` resolved for it)."""
        raise NotImplementedError

    def begin_pass(self) -> None:
        """Called before the first tensor of each merge pass (after :meth:`model_changed` when it applies)."""

    def model_changed(self) -> None:
        """Called when the loaded model is not the one of the previous pass: drop every cached statistic."""

    def release_statistics(self) -> None:
        """Free every statistic held (called before and after the engine's merge; not between the
        candidates of a search, which may reuse them)."""

    # ------------------------------------------------------------------ the engine's merge
    def merge(self):
        """The engine's merge (``Merges.merge``), with the statistics freed before and after it."""
        self.release_statistics()
        try:
            return super().merge()
        finally:
            self.release_statistics()
            self._end_pass()

    merge.engine_merge = True  # still an engine method (``uses_engine``): --search and --save adapter apply

    # ------------------------------------------------------------------ preflight
    def preflight(self) -> dict[str, Any]:
        found = super().preflight()
        self.load_calibration()
        return found

    def load_calibration(self) -> cal.Calibration:
        """Read the calibration prompts (no weights needed); one-line errors for unusable files."""
        n = len(self.model_refs())
        self.calibration = cal.load_calibration(self.calibration_files, n, self.calibration_examples, method=str(self.name))
        self._encoded.clear()
        return self.calibration

    # ------------------------------------------------------------------ the engine hook
    def merge_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        if name in self._done or not self._pass_names:
            self._start_pass()
        self._done.add(name)
        if self.keeps_theta0 and (self._reader is None or name not in self._reader.mapping):
            # θ₀ for later expert forward passes, in the parameter's dtype (the engine's θ₀ is then that param)
            self._theta0_copies[name] = base.detach().to("cpu", dtype=self._params[name].dtype, copy=True)
        if self.covers(name):
            out = self.merge_covered(name, base, task_vectors)
        else:
            out = self.fallback_tensor(name, base, task_vectors)
        if name == self._pass_names[-1]:
            self._end_pass()
        return out

    def _start_pass(self) -> None:
        if self.base_model is None or self.calibration is None:
            raise ConfigError(f"method '{self.name}': the calibration prompts and model must be loaded before merging")
        if self._model_ref is None or self._model_ref() is not self.base_model:
            self._model_ref = weakref.ref(self.base_model)
            self._encoded.clear()
            self.model_changed()
        touched: set[str] = set()
        for e in self.experts:
            touched |= set(e.param_names())
        self._params = dict(self.base_model.named_parameters())
        self._pass_names = [n for n in self._params if n in touched]
        self._done = set()
        self._theta0_copies = {}
        if self._reader is None:
            self._reader = open_base_reader(self.base_ref().local_path, self.base_model) if self.base_model_name else None
        self.begin_pass()

    def _end_pass(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._theta0_copies = {}
        self._params = {}
        self._pass_names = []

    def fallback_tensor(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """The data-free ``fallback`` method's merged task vector (with this method's resolved values)."""
        h = self.hparams
        key = h["fallback"]
        method = self._fallbacks.get(key)
        if method is None:
            method = self._fallbacks[key] = get_method_class(key)(key)
        specs = method.all_hyperparameters()
        method.hparams = {k: p.default for k, p in specs.items()}
        method.hparams.update({k: v for k, v in h.items() if k in specs and k != "fallback"})
        if "weights" in specs and not isinstance(method.hparams["weights"], list):
            method.hparams["weights"] = [method.hparams["weights"]] * len(task_vectors)
        if "density" in specs and not isinstance(method.hparams["density"], list):
            method.hparams["density"] = [method.hparams["density"]] * len(task_vectors)
        method.experts = self.experts
        return method.merge_tensor(name, base, task_vectors)

    # ------------------------------------------------------------------ helpers for subclasses
    def theta0(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        """θ₀ of parameter ``name`` in float32 on the parameter's device: its current value until this pass
        merged it, then from the base files (or a copy kept when the files cannot serve it). Always a tensor
        of the caller's own (``calibration.expert_weights`` adds τᵢ to it in place)."""
        if name not in self._done:
            return param.detach().to(dtype=torch.float32, copy=True)
        if self._reader is not None and name in self._reader.mapping:
            return self._reader.tensor(name, param).to(device=param.device)  # a fresh read
        # copy=True: for a float32 model on the CPU, .to() would hand out the kept copy itself, and the
        # expert's τ added to it would corrupt θ₀ for every later expert and group of this pass
        return self._theta0_copies[name].to(device=param.device, dtype=torch.float32, copy=True)

    @contextmanager
    def expert_forward(self, i: int, names: Sequence[str] | None = None) -> Iterator[list[str]]:
        """Within the block the loaded model is expert ``i`` on the parameters ``names`` (default: every
        parameter the expert changes): θ₀ + τᵢ, or θ₀ where expert ``i`` does not change a parameter this
        pass already merged; the others keep their current (base or merged) values."""
        with cal.expert_weights(self.base_model, self.experts[i], names, self.theta0, merged=self._done) as swapped:
            yield swapped

    def tokenizer_for_calibration(self):
        return self.tokenizer if self.architecture == "encoder_decoder" else self.input_tokenizer

    def calibration_ids(self, i: int | None = None) -> list[list[int]]:
        """Token ids of expert ``i``'s prompts (None: every distinct prompt, in ``all_prompts()`` order),
        tokenised once per loaded model and truncated to the context."""
        key = -1 if i is None else i
        if key not in self._encoded:
            prompts = self.calibration.all_prompts() if i is None else self.calibration.prompts_for(i)
            tok = self.tokenizer_for_calibration()
            max_len = cal.context_length(self.base_model, tok, self.max_seq_len)
            self._encoded[key] = cal.encode(tok, prompts, max_len)
        return self._encoded[key][0]

    def calibration_batches(self, i: int | None = None, tokens_per_batch: int | None = None
                            ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of expert ``i``'s prompts (:meth:`calibration_ids`), right-padded, on the model's input
        device; ``tokens_per_batch`` (default ``calibration_tokens_per_batch``) bounds each batch's tokens,
        padding included (1: one prompt per batch)."""
        ids = self.calibration_ids(i)
        tok = self.tokenizer_for_calibration()
        yield from cal.batches(ids, pad_id_of(tok), model_device(self.base_model),
                               tokens_per_batch or self.calibration_tokens_per_batch)

    def calibration_report(self) -> dict[str, Any]:
        """What report.json records under ``calibration``."""
        n = len(self.experts) if self.experts else len(self.model_refs())
        out: dict[str, Any] = {"files": list(self.calibration.files) if self.calibration else [],
                               "examples_limit": self.calibration_examples,
                               "prompts_per_expert": self.calibration.counts(n) if self.calibration else []}
        truncated = {k: v[1] for k, v in self._encoded.items()}
        if truncated:
            out["prompts_truncated"] = max(truncated.values())
        out.update(self.meter.as_dict())
        return out
