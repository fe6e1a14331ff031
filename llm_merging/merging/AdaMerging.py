"""``adamerging``: layer-wise AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning"): θ_l = θ₀_l + Σᵢ λᵢ,l τᵢ,l with the coefficients λ learned on unlabeled prompts.

λ starts at task arithmetic's coefficients (``scale`` × ``weights``ᵢ; with ``steps=0`` the result *is*
``task_arithmetic`` at the same values) and takes ``steps`` Adam steps (learning rate ``lr``; after each step
λ is clamped to [``lambda_min``, ``lambda_max``], the paper's [0, 1]) minimising the mean entropy of the merged
model's predictions over the calibration prompts (every distinct prompt, full batch each step):

* a prompt whose calibration record has ``answer_choices`` (kit multiple choice): the distribution over its
  choices, softmax of the evaluation's scores Σ log p(choice tokens | prompt) (never the label);
* any other prompt: the next-token distribution at the prompt's last position (encoder-decoder: the first
  output token).

A *layer group* (``granularity=layer``) is a numbered block of the model (``model.layers.3``; T5's
``encoder.block.3`` and ``decoder.block.3`` are two groups); every tensor outside the blocks is a group of
its module (``model.embed_tokens``, ``model.norm``, ``lm_head``). ``granularity=task``: one λ per expert
(task-wise AdaMerging). report.json ``calibration.adamerging`` holds the learned λ of every group and the
entropy after every step.

Each step: write θ₀ + Σ λτ into the loaded model, one backward pass over the prompts to the merged weights
(gradients of the touched tensors only), then ∂L/∂λᵢ,l = Σ_{t ∈ l} ⟨∂L/∂θ_t, τᵢ,t⟩ streamed tensor by tensor
(LoRA factors: ⟨G, BA⟩ = Σ (G Aᵀ) ⊙ B, no ΔW formed). Memory beyond the model: one copy and the gradient of
the touched tensors (model dtype), plus the activations of one batch of ``gradient_tokens_per_batch``
tokens (1024; halved and the pass rerun after an out-of-memory error). Multiple-choice prompts run once per
choice (prompt and choice together).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from llm_merging import ops
from llm_merging.core.errors import BudgetExceeded, ConfigError
from llm_merging.merging import calibration as cal
from llm_merging.merging.data_aware import DataAwareMerge
from llm_merging.merging.hparams import SCALE, WEIGHTS, Param
from llm_merging.merging.settings import layer_index
from llm_merging.model.scoring import model_device, pad_id_of, pad_sequences, truncate_left

logger = logging.getLogger(__name__)

GRADIENT_TOKENS = 1024  # tokens per backward batch: activations of ~1024 tokens of a 7B model are ~9 GB in fp16
STEPS = Param(10, "Adam steps of entropy minimisation (0: task arithmetic)", kind=int, low=0)
LR = Param(0.01, "Adam learning rate of the coefficients λ", low=0.0, low_open=True)
LAMBDA_MIN = Param(0.0, "lower clamp of λ after every step (the paper: 0)")
LAMBDA_MAX = Param(1.0, "upper clamp of λ after every step (the paper: 1)")
GRANULARITY = Param("layer", "one λ per expert and layer group (layer: each numbered block; embeddings, final norm "
                             "and head each their own) or one per expert (task)", kind=str, choices=("layer", "task"))


def layer_group(name: str, granularity: str = "layer") -> str:
    """The λ group of parameter ``name``: its numbered block (``model.layers.3``), else its module
    (``model.embed_tokens``, ``lm_head``); ``"all"`` with ``granularity="task"``."""
    if granularity == "task":
        return "all"
    found = layer_index(name)
    if found is not None:
        return f"{found[0]}.{found[1]}"
    return name.rpartition(".")[0] or name


class AdaMerging(DataAwareMerge):
    """AdaMerging (Yang et al. 2024): task arithmetic with per-layer coefficients learned by entropy minimisation."""

    hyperparameters = {"weights": WEIGHTS, "scale": SCALE, "steps": STEPS, "lr": LR, "lambda_min": LAMBDA_MIN,
                       "lambda_max": LAMBDA_MAX, "granularity": GRANULARITY}
    keeps_theta0 = False  # λ is learned before the first tensor is merged

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name or "adamerging")
        self._raw: dict | None = None
        self._key: Any = None
        self.groups: list[str] = []
        self._group_of: dict[str, int] = {}
        self.lambdas: torch.Tensor | None = None  # (experts, groups), float32 on the CPU
        self.entropies: list[float] = []  # mean entropy at λ after 0, 1, ..., steps steps
        self.optimised = 0  # how many times λ was learned (search candidates with new values learn again)
        #: tokens (padding included) per batch of the backward passes, halved after an out-of-memory error
        self.gradient_tokens_per_batch = GRADIENT_TOKENS

    def check_values(self, values: dict) -> None:
        if values["lambda_min"] > values["lambda_max"]:
            raise ConfigError(f"method '{self.name}': lambda_min {values['lambda_min']} is above lambda_max "
                              f"{values['lambda_max']}")

    def merge_resolved(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        self._raw = self.hparams  # the unresolved settings: begin_pass resolves them group by group
        try:
            return super().merge_resolved(name, base, task_vectors)
        finally:
            self._raw = None

    # ------------------------------------------------------------------ learning λ
    def begin_pass(self) -> None:
        raw = self._raw if self._raw is not None else self.hparams
        h = self.hparams
        names = list(self._pass_names)
        key = (repr(sorted(raw.items())), tuple(names))
        if key == self._key:  # the same values and tensors: λ depends on nothing else (experts, prompts)
            return
        self.groups = list(dict.fromkeys(layer_group(n, h["granularity"]) for n in names))
        index = {g: k for k, g in enumerate(self.groups)}
        self._group_of = {n: index[layer_group(n, h["granularity"])] for n in names}
        init = self._initial(raw, names)
        self.entropies = []
        if int(h["steps"]) == 0:
            self.lambdas = init
        else:
            self.lambdas = self._optimise(init, int(h["steps"]), float(h["lr"]), float(h["lambda_min"]),
                                          float(h["lambda_max"]))
            self.optimised += 1
        self._key = key

    def _initial(self, raw: dict, names: list[str]) -> torch.Tensor:
        """Task arithmetic's coefficients scale·wᵢ of each group (they must agree within a group)."""
        n = len(self.experts)
        init = torch.full((n, len(self.groups)), float("nan"), dtype=torch.float64)
        resolved = self.hparams
        self.hparams = raw
        try:
            for name in names:
                v = self.resolve_hparams(name, n)
                w = v["weights"] if isinstance(v["weights"], list) else [v["weights"]] * n
                col = torch.tensor([float(v["scale"]) * float(x) for x in w], dtype=torch.float64)
                g = self._group_of[name]
                if torch.isnan(init[:, g]).all():
                    init[:, g] = col
                elif not torch.equal(init[:, g], col):
                    raise ConfigError(f"method '{self.name}': weights × scale differ between the tensors of layer group "
                                      f"'{self.groups[g]}' (e.g. at '{name}'); AdaMerging learns one λ per group")
        finally:
            self.hparams = resolved
        return init.to(torch.float32)

    def _optimise(self, init: torch.Tensor, steps: int, lr: float, low: float, high: float) -> torch.Tensor:
        lam = torch.nn.Parameter(init.clone())
        opt = torch.optim.Adam([lam], lr=lr)
        rows = self._rows()
        with self._session() as (orig, params), self.meter.timing():
            for step in tqdm(range(steps + 1), desc=f"{self.name}: steps", disable=not self.progress, leave=False):
                entropy, grad = self._evaluate(lam.detach(), rows, orig, params, grad=step < steps)
                self.entropies.append(entropy)
                if grad is None:  # the entropy at the learned λ
                    break
                lam.grad = grad
                opt.step()
                with torch.no_grad():
                    lam.clamp_(low, high)
        logger.info("%s: mean entropy %.4f -> %.4f in %d steps", self.name, self.entropies[0], self.entropies[-1], steps)
        return lam.detach().clone()

    @contextmanager
    def _session(self) -> Iterator[tuple[dict[str, torch.Tensor], dict]]:
        """Within the block the touched parameters may be overwritten (``orig``: their θ₀ data); afterwards
        they hold θ₀ again (the same storage) and every ``requires_grad`` flag is as before."""
        params = dict(self.base_model.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        orig = {n: params[n].data for n in self._pass_names}
        try:
            for p in params.values():
                p.requires_grad_(False)
            yield orig, params
        finally:
            for n, data in orig.items():
                params[n].data = data
                params[n].grad = None
            for n, p in params.items():
                p.requires_grad_(flags[n])

    def _evaluate(self, lam: torch.Tensor, rows, orig: dict[str, torch.Tensor], params: dict, *,
                  grad: bool) -> tuple[float, torch.Tensor | None]:
        """The mean entropy L at coefficients ``lam`` (experts × groups) and, with ``grad``, ∂L/∂λ."""
        self._write(lam, orig, params)
        if not grad:
            return self._entropy(rows, backward=False), None
        for n in orig:
            params[n].requires_grad_(True)
            params[n].grad = None
        oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
        try:
            while True:
                try:
                    with torch.enable_grad():
                        entropy = self._entropy(rows, backward=True, tokens_per_batch=self.gradient_tokens_per_batch)
                    break
                except oom:
                    for n in orig:
                        params[n].grad = None
                    if self.gradient_tokens_per_batch <= 1:
                        raise
                    self.gradient_tokens_per_batch = max(1, self.gradient_tokens_per_batch // 2)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    logger.warning("%s: out of memory in the backward pass; %d tokens per batch from now on",
                                   self.name, self.gradient_tokens_per_batch)
            return entropy, self._lambda_grad(orig, params) / max(len(rows), 1)  # of the sum, hence the mean
        finally:
            for n in orig:
                params[n].grad = None
                params[n].requires_grad_(False)

    @torch.no_grad()
    def _write(self, lam: torch.Tensor, orig: dict[str, torch.Tensor], params: dict) -> None:
        """θ₀ + Σᵢ λᵢ,l τᵢ into every touched parameter (new storage; ``orig`` keeps θ₀)."""
        for name, data in orig.items():
            theta0 = data.to(torch.float32)
            tvs = [e.delta(name, theta0) for e in self.experts]
            tvs = [torch.zeros_like(theta0) if t is None else t.to(device=theta0.device, dtype=torch.float32) for t in tvs]
            merged = ops.task_arithmetic(tvs, weights=lam[:, self._group_of[name]].tolist(), scale=1.0)
            params[name].data = merged.add_(theta0).to(dtype=data.dtype)
            del theta0, tvs, merged

    @torch.no_grad()
    def _lambda_grad(self, orig: dict[str, torch.Tensor], params: dict) -> torch.Tensor:
        """∂L/∂λᵢ,l = Σ_{t in group l} ⟨∂L/∂θ_t, τᵢ,t⟩ (LoRA factors where the task vector is B·A alone)."""
        grad = torch.zeros((len(self.experts), len(self.groups)), dtype=torch.float64)
        for name, data in orig.items():
            g = params[name].grad
            if g is None:
                continue
            col = self._group_of[name]
            for i, e in enumerate(self.experts):
                plain_lora = name not in getattr(e, "replacements", {}) and name not in getattr(e, "_token_params", {})
                pair = e.factors(name, g.device) if plain_lora else None
                if pair is not None:
                    grad[i, col] += ops.task_vector_inner(g, factors=pair)
                    continue
                tv = e.delta(name, data.to(torch.float32))
                if tv is not None:
                    grad[i, col] += ops.task_vector_inner(g, tv)
                del tv
        return grad.to(torch.float32)

    # ------------------------------------------------------------------ the objective
    def _rows(self) -> list[tuple[list[int], list[list[int]] | None]]:
        """``(prompt ids, choice ids or None)`` of every distinct calibration prompt."""
        prompts = self.calibration.all_prompts()
        ids = self.calibration_ids(None)
        enc_dec = self.architecture == "encoder_decoder"
        tok = self.tokenizer_for_calibration()
        choice_tok = self.tokenizer if enc_dec else self.target_tokenizer
        limit = cal.context_length(self.base_model, tok, self.max_seq_len)
        bos = getattr(tok, "bos_token_id", None)
        rows = []
        for text, p in zip(prompts, ids):
            choices = self.calibration.choices.get(text)
            if not choices:
                rows.append((p, None))
                continue
            c_ids = [list(x) for x in choice_tok(choices)["input_ids"]]
            if not enc_dec:  # the prompt and its longest choice must fit the context together
                longest = max(len(c) for c in c_ids)
                if len(p) + longest > limit:
                    p = truncate_left(p, limit - longest, keep_first=bos is not None and p[:1] == [bos])
            rows.append((p, c_ids))
        return rows

    def _check_budget(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise BudgetExceeded(f"time budget ran out while method '{self.name}' learned its coefficients; nothing was saved")

    def _entropy(self, rows, *, backward: bool, tokens_per_batch: int | None = None) -> float:
        """Mean entropy over ``rows`` of the current model's prediction distributions (backward: accumulate
        the gradient of their **sum** in the touched parameters' ``.grad``)."""
        device = model_device(self.base_model)
        pad = pad_id_of(self.tokenizer_for_calibration())
        budget = tokens_per_batch or self.calibration_tokens_per_batch
        total = 0.0
        n = len(rows)
        gen = [p for p, c in rows if c is None]
        for batch in cal.batches(gen, pad, device, budget):
            self._check_budget()
            with torch.set_grad_enabled(backward):
                h = ops.entropy(self._next_token_logits(batch))
                if backward:
                    h.sum().backward()  # the sum: half-precision gradients stay clear of underflow
            total += float(h.detach().sum())
        mc = [r for r in rows if r[1] is not None]
        start = 0
        while start < len(mc):
            size, tokens = 0, 0
            while start + size < len(mc):
                p, cs = mc[start + size]
                cost = sum(len(p) + len(c) for c in cs)
                if size and tokens + cost > budget:
                    break
                size, tokens = size + 1, tokens + cost
            chunk = mc[start:start + size]
            start += size
            self._check_budget()
            with torch.set_grad_enabled(backward):
                scores, mask = self._choice_scores(chunk, pad, device)
                h = ops.entropy(scores, mask)
                if backward:
                    h.sum().backward()  # the sum: half-precision gradients stay clear of underflow
            total += float(h.detach().sum())
        return total / max(n, 1)

    def _next_token_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, V)`` of the next token after each (right-padded) prompt."""
        model = self.base_model
        self.meter.forward_passes += 1
        self.meter.tokens += int(batch["attention_mask"].sum())
        if self.architecture == "encoder_decoder":
            start = torch.full((batch["input_ids"].shape[0], 1), cal.decoder_start(model), dtype=torch.long,
                               device=batch["input_ids"].device)
            return model(**batch, decoder_input_ids=start, use_cache=False).logits[:, 0]
        logits = model(**batch, use_cache=False).logits
        last = batch["attention_mask"].sum(dim=1) - 1
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    def _choice_scores(self, chunk, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores (R, C), mask (R, C))``: Σ log p(choice tokens | prompt) of every choice of each row."""
        model = self.base_model
        pairs = [(r, p, c) for r, (p, cs) in enumerate(chunk) for c in cs]
        width = max(len(cs) for _, cs in chunk)
        if self.architecture == "encoder_decoder":
            ids, mask = pad_sequences([p for _, p, _ in pairs], pad, "right", device)
            labels, lmask = pad_sequences([c for _, _, c in pairs], pad, "right", device)
            dec = (model.prepare_decoder_input_ids_from_labels(labels=labels)
                   if hasattr(model, "prepare_decoder_input_ids_from_labels") else model._shift_right(labels))
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=lmask,
                           use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            flat = (logp * lmask).sum(dim=1)
            tokens = int(mask.sum()) + int(lmask.sum())
        else:
            ids, mask = pad_sequences([p + c[:-1] for _, p, c in pairs], pad, "right", device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            rows_i, pos_i, tgt = [], [], []
            for j, (_, p, c) in enumerate(pairs):
                for k, t in enumerate(c):
                    rows_i.append(j)
                    pos_i.append(len(p) - 1 + k)  # the position whose next token is choice token k
                    tgt.append(t)
            rows_t = torch.tensor(rows_i, dtype=torch.long, device=logits.device)
            sel = logits[rows_t, torch.tensor(pos_i, dtype=torch.long, device=logits.device)]
            lp = torch.log_softmax(sel.float(), dim=-1).gather(
                -1, torch.tensor(tgt, dtype=torch.long, device=logits.device).unsqueeze(-1)).squeeze(-1)
            flat = torch.zeros(len(pairs), dtype=torch.float32, device=logits.device).index_add(0, rows_t, lp)
            tokens = int(mask.sum())
        self.meter.forward_passes += 1
        self.meter.tokens += tokens
        scores = torch.zeros((len(chunk), width), dtype=torch.float32, device=flat.device)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool, device=flat.device)
        r_idx = torch.tensor([r for r, _, _ in pairs], dtype=torch.long, device=flat.device)
        c_idx = torch.tensor([k for _, cs in chunk for k in range(len(cs))], dtype=torch.long, device=flat.device)
        scores = scores.index_put((r_idx, c_idx), flat)
        valid[r_idx, c_idx] = True
        return scores, valid

    # ------------------------------------------------------------------ merge
    def covers(self, name: str) -> bool:
        return True

    def merge_covered(self, name: str, base: torch.Tensor, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        h = self.hparams
        if int(h["steps"]) == 0:  # nothing learned: exactly task arithmetic
            return ops.task_arithmetic(task_vectors, weights=h["weights"], scale=h["scale"])
        return ops.task_arithmetic(task_vectors, weights=self.lambdas[:, self._group_of[name]].tolist(), scale=1.0)

    def calibration_report(self) -> dict[str, Any]:
        out = super().calibration_report()
        if self.lambdas is not None:
            names = [str(getattr(e, "name", i)) for i, e in enumerate(self.experts)] or \
                    [str(r) for r in self.model_refs()]
            out["adamerging"] = {
                "granularity": self.hparams.get("granularity") if not isinstance(self.hparams.get("granularity"), list)
                else None,
                "experts": names,
                "lambdas": {g: [round(float(v), 6) for v in self.lambdas[:, k]] for k, g in enumerate(self.groups)},
                "entropy_per_step": [round(v, 6) for v in self.entropies],
                "prompts": len(self.calibration.all_prompts()) if self.calibration else 0,
                "choice_prompts": len(self.calibration.choices) if self.calibration else 0,
            }
        return out

