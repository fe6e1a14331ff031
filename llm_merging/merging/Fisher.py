"""``fisher``: Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

θ = Σᵢ wᵢ F̃ᵢ θᵢ / Σᵢ wᵢ F̃ᵢ per coordinate, F̃ᵢ = max(Fᵢ, ε), for every parameter an expert changes
(``ops.fisher_merge``; the merged task vector is then scaled by ``scale``, 1 in the paper). Fᵢ is expert i's
diagonal Fisher at θᵢ: the mean over its calibration prompts of the squared **per-example** gradient (one
backward pass per prompt) of the log-likelihood of the expert's own greedy predictions, i.e. the argmax next
token at every prompt position (``positions=all``; the mean over the positions, so that a prompt's length
does not scale its Fisher) or at the prompt's last position only (``last``). The
argmax is the mode of the model's distribution (the paper samples from it or takes the label). For an
encoder-decoder the prediction is the first output token (the decoder starts from its start token).
Coordinates no expert changes keep the base; so do those with no Fisher at all when ε = 0 (with ε > 0 they
get the weighted mean of the task vectors). LoRA experts: Fᵢ is the Fisher of the dense weight W at
θ₀ + BA (every touched tensor, for every expert, including those the expert leaves at θ₀).

Memory: one expert at a time is swapped into the loaded model; its Fisher is accumulated in float32 on the
model's device for as many parameters at once as ``FISHER_FRACTION`` of the free memory allows (gradient
plus accumulator; the rest in further passes over the prompts), then written to a temporary safetensors
file (``$TMPDIR``, removed after the merge; too little free space there is a one-line error before any
pass). The merge then streams tensor by tensor, reading each expert's Fisher of that tensor only. Disk:
4 bytes × touched values × experts. Float16 parameters: the backward pass runs on 1024·ℓ, unscaled in
float32 (an example whose scaled gradients overflow is run again at a smaller scale).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError
from llm_merging.core.io import scratch_dir
from llm_merging.core.resources import available_bytes
from llm_merging.merging import calibration as cal
from llm_merging.merging.data_aware import DataAwareMerge
from llm_merging.merging.hparams import SCALE, Param
from llm_merging.model import engine
from llm_merging.model.refs import hf_token
from llm_merging.model.scoring import model_device

logger = logging.getLogger(__name__)

FISHER_FRACTION = 0.3  # of the free memory on the model's device, for one chunk's gradients and accumulators
HALF_LOSS_SCALE = 1024.0  # float16 parameters: the backward pass runs on 1024·ℓ (per-example gradients are small)
EPS = Param(1e-10, "Fisher floor ε: F̃ = max(F, ε); where every expert's Fisher is below it the result is the "
                   "weighted mean (0: such coordinates keep the base)", low=0.0)
POSITIONS = Param("all", "greedy predictions whose log-likelihood defines the Fisher: every prompt position (all) "
                         "or the prompt's last position only (last)", kind=str, choices=("all", "last"))
FISHER_WEIGHTS = Param(1.0, "coefficient wᵢ of each model (≥ 0; one value, or one per model)", per_model=True, low=0.0)


class Fisher(DataAwareMerge):
    """Fisher merging (Matena & Raffel 2022): per-coordinate average weighted by each expert's diagonal Fisher."""

    hyperparameters = {"weights": FISHER_WEIGHTS, "scale": SCALE, "eps": EPS, "positions": POSITIONS}
    keeps_theta0 = False  # every Fisher is gathered before the first tensor is merged

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name or "fisher")
        self.fisher_memory: int | None = None  # bytes per chunk of gradients + accumulators (None: a share of free memory)
        self._dir: str | None = None
        self._files: list[list[str]] = []  # per expert: its safetensors chunk files
        self._where: list[dict[str, str]] = []  # per expert: parameter name -> file
        self._key: Any = None
        self.fisher_info: dict[str, Any] = {}
        self.gathered = 0  # how many times the Fisher was gathered (once per loaded model and positions)

    def check_values(self, values: dict) -> None:
        w = values.get("weights")
        if isinstance(w, list) and sum(w) <= 0:
            raise ConfigError(f"method '{self.name}': weights {w} must have a positive sum")

    def scratch_space(self) -> list[tuple[str, int, str]]:
        """The experts' Fisher spilled to ``$TMPDIR``: 4 bytes × touched values × experts (from the configs
        and the experts' headers, no weights)."""
        shapes = engine.config_param_shapes(self.base_ref().resolve(hf_token()), self.architecture)
        experts = self.open_experts(shapes)
        try:
            touched = set().union(*(set(e.param_names()) for e in experts))
        finally:
            for e in experts:
                e.close()
        values = sum(math.prod(shapes[n]) for n in touched if n in shapes)
        return [(tempfile.gettempdir(), 4 * len(experts) * values, "the experts' Fisher (temporary)")]

    # ------------------------------------------------------------------ statistics
    def model_changed(self) -> None:
        self.release_statistics()

    def release_statistics(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir, self._files, self._where, self._key = None, [], [], None

    def begin_pass(self) -> None:
        key = (self.hparams["positions"], tuple(self._pass_names))
        if self._key != key:  # the Fisher depends on the experts and prompts only: reused by --search candidates
            self.release_statistics()
            self._gather(self.hparams["positions"])
            self._key = key

    def _chunks(self) -> list[list[str]]:
        """The touched parameters in chunks whose gradients and float32 accumulators fit the budget."""
        params = dict(self.base_model.named_parameters())
        if self.fisher_memory is not None:
            budget = float(self.fisher_memory)
        else:
            budget = FISHER_FRACTION * available_bytes(model_device(self.base_model))
        chunks: list[list[str]] = [[]]
        used = 0
        for name in self._pass_names:
            p = params[name]
            cost = p.numel() * (p.element_size() + 4)
            if chunks[-1] and used + cost > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(name)
            used += cost
        return chunks

    def _gather(self, positions: str) -> None:
        from safetensors.torch import save_file

        params = dict(self.base_model.named_parameters())
        need = 4 * len(self.experts) * sum(params[n].numel() for n in self._pass_names)
        free = shutil.disk_usage(tempfile.gettempdir()).free
        if need > free:
            raise ConfigError(f"method '{self.name}': the experts' Fisher needs {need / 2**30:.1f} GiB of temporary disk "
                              f"but {tempfile.gettempdir()} has {free / 2**30:.1f} GiB free; set TMPDIR to a larger disk")
        self._dir = str(scratch_dir("fisher"))  # marked: a later run removes it if this process dies
        self.gathered += 1
        chunks = self._chunks()
        if len(chunks) > 1:
            logger.info("%s: Fisher gathered in %d chunks of parameters (one pass over the prompts each)",
                        self.name, len(chunks))
        flags = {n: p.requires_grad for n, p in params.items()}
        written = 0
        prompts = []
        try:
            for p in params.values():
                p.requires_grad_(False)
            with self.meter.timing():
                for i in range(len(self.experts)):
                    files, where = [], {}
                    with self.expert_forward(i):
                        for c, names in enumerate(chunks):
                            fisher, n = self._expert_fisher(i, names, positions, params)
                            self.meter.statistics_bytes = max(self.meter.statistics_bytes,
                                                              sum(t.numel() * 4 for t in fisher.values()))
                            path = os.path.join(self._dir, f"expert{i}-chunk{c}.safetensors")
                            save_file({k: v.cpu().contiguous() for k, v in fisher.items()}, path)
                            written += os.path.getsize(path)
                            files.append(path)
                            where.update({k: path for k in fisher})
                            del fisher
                    prompts.append(n)
                    self._files.append(files)
                    self._where.append(where)
        except BaseException:
            self.release_statistics()
            raise
        finally:
            for name, p in params.items():
                p.requires_grad_(flags[name])
        self.fisher_info = {"per_example_gradients": True, "positions": positions, "chunks": len(chunks),
                            "prompts_per_expert": prompts, "disk_mib": round(written / 2**20, 1)}

    def _expert_fisher(self, i: int, names: list[str], positions: str, params: dict) -> tuple[dict, int]:
        """Expert i's diagonal Fisher of ``names`` (the model holds expert i's weights)."""
        targets = {n: params[n] for n in names}
        for p in targets.values():
            p.requires_grad_(True)
        try:
            examples = tqdm(self.calibration_batches(i, tokens_per_batch=1),  # one prompt per batch: per-example
                            total=len(self.calibration.prompts_for(i)), desc=f"fisher: expert {i}",  # gradients
                            unit="prompt", disable=not self.progress, leave=False)
            half = any(p.dtype == torch.float16 for p in targets.values())  # scaled backward: no underflow
            with torch.enable_grad():
                fisher, n = ops.diagonal_fisher(lambda batch: self._log_likelihood(batch, positions), examples, targets,
                                                loss_scale=HALF_LOSS_SCALE if half else 1.0)
        finally:
            for p in targets.values():
                p.requires_grad_(False)
        return fisher, n

    def _log_likelihood(self, batch: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
        """log p of the model's greedy predictions on one prompt (``batch``: one unpadded row)."""
        model = self.base_model
        if self.should_stop is not None and self.should_stop():
            raise BudgetExceeded(f"time budget ran out while method '{self.name}' gathered Fisher information; "
                                 "nothing was saved")
        self.meter.forward_passes += 1
        self.meter.tokens += int(batch["attention_mask"].sum())
        if getattr(model.config, "is_encoder_decoder", False):
            start = torch.full((batch["input_ids"].shape[0], 1), cal.decoder_start(model), dtype=torch.long,
                               device=batch["input_ids"].device)
            logits = model(**batch, decoder_input_ids=start, use_cache=False).logits
            return ops.greedy_log_likelihood(logits)
        logits = model(**batch, use_cache=False).logits
        mask = batch["attention_mask"].bool()
        if positions == "last":
            last = mask.sum(dim=1) - 1
            mask = torch.zeros_like(mask)
            mask[torch.arange(mask.shape[0], device=mask.device), last] = True
        return ops.greedy_log_likelihood(logits, mask, reduce="mean")

    def _fisher(self, name: str, device) -> list[torch.Tensor]:
        from safetensors import safe_open

        out = []
        for where in self._where:
            with safe_open(where[name], framework="pt", device=str(device)) as f:
                out.append(f.get_tensor(name))
        return out

    # ------------------------------------------------------------------ merge
    def covers(self, name: str) -> bool:
        return True

    def merge_covered(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        fishers = self._fisher(name, base.device)
        out = ops.fisher_merge(task_vectors, fishers, weights=h["weights"], eps=h["eps"])
        return out.mul_(float(h["scale"]))

    def calibration_report(self) -> dict[str, Any]:
        out = super().calibration_report()
        if self.fisher_info:
            out["fisher"] = dict(self.fisher_info)
        return out

