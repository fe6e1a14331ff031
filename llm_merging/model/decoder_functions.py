"""Scoring and generation for decoder-only (causal) language models, starter-kit compatible.

Kit-compatible entry points (same positional signatures as the starter kit):

* ``predict_multiple_choice(transformer, input_tokenizer, target_tokenizer, batch, *, scoring="exact")``
  -> ``(predicted_choice LongTensor[B], scores FloatTensor[B, max_choices])``;
* ``generate(transformer, input_tokenizer, target_tokenizer, batch, max_gen_len)`` -> ``(ids, texts)``;
* ``tokenize_batch(input_tokenizer, target_tokenizer, batch, device)`` -> padded tensors.

A batch is the kit's dict of lists (``input``, ``answer_choices``, ...). Answer choices may be lists or
the kit CSV's Python-list strings, and their number may differ between the examples of a batch (missing
choices score ``-inf``).

Multiple choice (``scoring="exact"``): score = sum of log p(choice tokens | prompt), every choice token
included. The prompts (``input_tokenizer``) run once, right-padded and without a mask, so the fast
causal attention kernels apply; each prompt's last real position gives the distribution of the first
choice token, and its KV cache (a transformers ``DynamicCache``) is copied to each of its choices, which
then run only their own tokens (``target_tokenizer``: no BOS, EOS appended) minus the last one, with
the prompt's padding masked and positions continuing from the prompt's length. Logits are computed
only where a choice token is scored. ``scoring="starter_kit"`` drops the first-token term, as the kit's
decoder code does (it conditions on the first choice token instead of scoring it).

Generation: greedy, ``max_new_tokens = max_gen_len``, per-sequence EOS stop, text = new tokens with
special tokens skipped. The same right-padded prefill is followed by one batched step per token
(finished sequences leave the batch); models without ``position_ids``/2D ``logits_to_keep`` support
use ``model.generate`` on left-padded prompts instead. Where a padding gap would change results (a model
without ``position_ids``, or a sliding window shorter than prompt plus continuation, since windows
count cache positions), scoring runs per group of equally long prompts and generation uses left padding.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Sequence

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.model.scoring import (  # noqa: F401 (shared with encoder_decoder_functions; re-exported for this module's callers)
    CHUNK_OVERHEAD_TOKENS,
    FORWARD_TOKENS,
    NO_LIMIT,
    SCORINGS,
    as_id_list,
    as_texts,
    cache_kwarg,
    cache_rows,
    check_scoring,
    choice_lists,
    chunk_overhead,
    continuation_scores,
    encode_prompts,
    first_token_scores,
    forward_owner,
    forward_params,
    forward_tokens,
    greedy_generation_config,
    length_limit,
    model_device,
    pad_id_of,
    pad_sequences,
    plan_chunks,
    select_rows,
    split_choice_scores,
    stack_caches,
    stackable,
    trim_generated,
    truncate_left,
    with_room,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- helpers
# (shared with encoder_decoder_functions)


def sliding_window(model) -> int | None:
    """The attention window of a model with sliding-window layers (Mistral v0.1, Gemma 2/3), else None."""
    cfg = getattr(forward_owner(model), "config", None)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return int(window)


@functools.lru_cache(maxsize=None)
def _bool_logits_to_keep(cls) -> bool:
    """Whether ``cls.forward`` slices hidden states with transformers' ``slice_logits_to_keep``
    (which accepts a 2D boolean mask and returns logits for the True positions only)."""
    if "logits_to_keep" not in forward_params(cls):
        return False
    try:
        return "slice_logits_to_keep(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


# --------------------------------------------------------------------------------------------- kit API

def tokenize_batch(input_tokenizer, target_tokenizer, batch, device=None) -> dict:
    """Kit-compatible tokenisation: ``input_ids``/``input_mask`` (left-padded, input tokenizer) and
    ``answer_choices_ids``/``..._mask``, ``target_ids``/``..._mask`` (right-padded, target tokenizer).

    The batch is not modified.
    """
    pad = pad_id_of(input_tokenizer, target_tokenizer)
    out: dict[str, torch.Tensor] = {}
    if "input" in batch:
        ids = input_tokenizer(as_texts(batch["input"]))["input_ids"]
        out["input_ids"], out["input_mask"] = pad_sequences(ids, pad, "left", device)
    if "answer_choices" in batch:
        flat = [c for cs in choice_lists(batch) for c in cs]
        ids = target_tokenizer(flat)["input_ids"] if flat else []
        out["answer_choices_ids"], out["answer_choices_mask"] = pad_sequences(ids, pad, "right", device)
    if "target" in batch:
        ids = target_tokenizer(as_texts(batch["target"]))["input_ids"]
        out["target_ids"], out["target_mask"] = pad_sequences(ids, pad, "right", device)
    return out


def predict_multiple_choice(
    transformer,
    input_tokenizer,
    target_tokenizer,
    batch,
    *,
    scoring: str = "exact",
):
    """Score every answer choice of every example; returns ``(predicted_choice[B], scores[B, C])``.

    ``C`` is the largest number of choices in the batch; missing choices score ``-inf``. Tensors are
    returned on the CPU, scores in float32.
    """
    check_scoring(scoring)
    choices = choice_lists(batch)
    flat = [c for cs in choices for c in cs]
    choice_ids = [list(x) for x in target_tokenizer(flat)["input_ids"]] if flat else []
    counts = [len(cs) for cs in choices]
    longest_choice = max((len(c) for c in choice_ids), default=0)
    prompt_ids = encode_prompts(transformer, input_tokenizer, batch["input"], reserve=longest_choice)
    kwargs = {"pad_id": pad_id_of(input_tokenizer, target_tokenizer), "score_first_token": scoring == "exact"}
    if not _padding_gap_is_safe(transformer, prompt_ids, longest_choice):
        flat_scores = _score_by_prompt_length(transformer, prompt_ids, choice_ids, counts, **kwargs)
    else:
        flat_scores = score_choices(transformer, prompt_ids, choice_ids, counts, **kwargs)
    return split_choice_scores(flat_scores, counts)


def _padding_gap_is_safe(model, prompt_ids: Sequence[Sequence[int]], extra: int) -> bool:
    """Whether right-padded prompts can be continued across their padding gap: the model must take
    ``position_ids``, and a sliding window (counted in cache positions) must cover the longest prompt
    plus ``extra`` continuation tokens."""
    if "position_ids" not in forward_params(type(forward_owner(model))):
        return False
    window = sliding_window(model)
    return window is None or max((len(p) for p in prompt_ids), default=0) + extra <= window


def _score_by_prompt_length(model, prompt_ids, choice_ids, counts, **kwargs) -> torch.Tensor:
    """:func:`score_choices` on groups of equally long prompts (no padding gap), scores in input order."""
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(len(p), []).append(i)
    out = torch.zeros(len(choice_ids), dtype=torch.float32)
    for rows in groups.values():
        flat = [j for i in rows for j in range(starts[i], starts[i + 1])]
        scores = score_choices(model, [prompt_ids[i] for i in rows], [choice_ids[j] for j in flat],
                               [counts[i] for i in rows], **kwargs)
        out[torch.as_tensor(flat, dtype=torch.long)] = scores
    return out


def _prefill(model, prompt_ids: Sequence[Sequence[int]], pad_id: int):
    """Run right-padded prompts through the model without an attention mask.

    Right padding keeps every real token before the padding, so plain causal attention is exact for
    real positions and the fast ``is_causal`` kernels apply (no 4D mask is built; with left padding a
    masked kernel runs over the whole prompt). The padded positions produce cache entries that later
    passes mask out. Where the padded batch exceeds the device's :func:`scoring.forward_tokens`
    (CPUs), prompts run in pieces of similar length (:func:`scoring.plan_chunks`) whose caches are
    joined into one. Returns ``(cache, last_logp[B, V], lengths[B], prompt_mask[B, Lp])``.
    """
    device = model_device(model)
    ids, mask = pad_sequences(prompt_ids, pad_id, "right", device)
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ConfigError("empty prompt: the input tokenizer produced no tokens")
    budget = forward_tokens(device)
    if budget is None or ids.numel() <= budget or len(prompt_ids) == 1:
        cache, logits = _prefill_forward(model, ids, lengths)
        return cache, torch.log_softmax(logits.float(), dim=-1), lengths, mask
    parts, logits = [], None
    for rows in plan_chunks([len(p) for p in prompt_ids], chunk_overhead(device), budget):
        sub_ids, _ = pad_sequences([prompt_ids[i] for i in rows], pad_id, "right", device)
        cache, sub_logits = _prefill_forward(model, sub_ids, lengths[rows])
        if not stackable(cache):  # a cache that cannot be joined (e.g. recurrent layers): one forward
            cache, logits = _prefill_forward(model, ids, lengths)
            return cache, torch.log_softmax(logits.float(), dim=-1), lengths, mask
        if logits is None:
            logits = sub_logits.new_empty((len(prompt_ids), sub_logits.shape[-1]))
        logits[torch.as_tensor(rows, device=device)] = sub_logits
        parts.append((cache, rows))
    cache = stack_caches(model.config, parts, len(prompt_ids))
    return cache, torch.log_softmax(logits.float(), dim=-1), lengths, mask


def _prefill_forward(model, ids: torch.Tensor, lengths: torch.Tensor):
    """One unmasked forward of right-padded ``ids``: ``(cache, logits[B, V] at each row's last real token)``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kwargs = {"input_ids": ids, cache_kwarg(model): cache, "use_cache": True}
    last = (lengths - 1)[:, None]  # [B, 1] position of each prompt's last real token
    if _bool_logits_to_keep(type(forward_owner(model))):
        return cache, model(**kwargs, logits_to_keep=last).logits[:, -1, :]
    return cache, _gather_last(model(**kwargs).logits, last)


def _gather_last(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    index = last[:, :, None].expand(-1, 1, logits.shape[-1])
    return logits.gather(1, index).squeeze(1)


def fast_path_supported(model) -> bool:
    """Whether the model takes ``position_ids`` and 2D ``logits_to_keep`` (modern transformers models);
    otherwise generation falls back to ``model.generate`` with left padding."""
    owner = type(forward_owner(model))
    return "position_ids" in forward_params(owner) and _bool_logits_to_keep(owner)


@torch.inference_mode()
def score_choices(
    model,
    prompt_ids: Sequence[Sequence[int]],
    choice_ids: Sequence[Sequence[int]],
    counts: Sequence[int],
    *,
    pad_id: int = 0,
    score_first_token: bool = True,
) -> torch.Tensor:
    """Sum of log-probabilities of each choice's tokens given its prompt (decoder-only model).

    ``choice_ids`` is flat: the first ``counts[0]`` choices belong to prompt 0, and so on. Returns a
    float32 CPU tensor ``[len(choice_ids)]``.
    """
    device = model_device(model)
    if not choice_ids:
        return torch.zeros(0)
    cache, last_logp, lengths, prompt_mask = _prefill(model, prompt_ids, pad_id)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device),
                                    torch.as_tensor(list(counts), device=device))
    params = forward_params(type(forward_owner(model)))
    keep_mask = _bool_logits_to_keep(type(forward_owner(model)))
    cache_kw = cache_kwarg(model)

    def run(rows, ids, mask, need):
        # Each choice continues its prompt's cache: the prompt's padding (a hole between prompt and
        # choice) is masked, positions continue from the prompt's real length.
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.cat([prompt_mask[rows], mask], dim=1),
            cache_kw: cache_rows(cache, rows),
            "use_cache": True,
        }
        if "position_ids" in params:
            kwargs["position_ids"] = lengths[rows, None] + torch.arange(ids.shape[1], device=device)[None, :]
        if keep_mask:
            return model(**kwargs, logits_to_keep=need).logits  # only the scored positions
        return model(**kwargs).logits[need]

    scores = continuation_scores(choice_ids, owner, pad_id, device, run)
    if score_first_token:
        scores += first_token_scores(last_logp, choice_ids, owner)
    return scores.cpu()


@torch.inference_mode()
def greedy_decode(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_ids: Sequence[int], pad_id: int) -> list[list[int]]:
    """Batched greedy decoding with right-padded prompts (see :func:`_prefill`).

    Each new token is appended after the longest prompt, its position continuing from its own prompt's
    length, the padding hole masked; the cache is a preallocated ``StaticCache`` (:func:`scoring.with_room`),
    written in place. Sequences that reach EOS leave the batch (their cache rows are dropped). Returns the new token ids of each prompt, up to and including its first EOS.
    """
    device = model_device(model)
    cache, last_logp, lengths, mask = _prefill(model, prompt_ids, pad_id)
    cache = with_room(model.config, cache, max_new_tokens)
    eos = torch.as_tensor(list(eos_ids) or [-1], device=device)
    n = len(prompt_ids)
    out: list[list[int]] = [[] for _ in range(n)]
    active = torch.arange(n, device=device)
    next_tok = last_logp.argmax(-1)
    kw = cache_kwarg(model)
    for step in range(max_new_tokens):
        for row, tok in zip(active.tolist(), next_tok.tolist()):
            out[row].append(tok)
        if step == max_new_tokens - 1:
            break
        alive = ~torch.isin(next_tok, eos)
        if not bool(alive.all()):
            if not bool(alive.any()):
                break
            keep = alive.nonzero().squeeze(-1)
            select_rows(cache, keep)
            active, next_tok, lengths, mask = active[keep], next_tok[keep], lengths[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=(lengths + step)[:, None],
                       use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        next_tok = logits[:, -1, :].argmax(-1)
    return out


@torch.inference_mode()
def generate(
    transformer,
    input_tokenizer,
    target_tokenizer,
    batch,
    max_gen_len,
):
    """Greedy generation, batched; returns ``(ids, texts)``.

    ``ids``: the new token ids of each example (up to and including its first EOS); ``texts``: their
    decoding with special tokens skipped. Models without the fast path (see
    :func:`fast_path_supported`) use ``model.generate`` with left padding.
    """
    cfg = greedy_generation_config(transformer, input_tokenizer, max_gen_len)
    prompt_ids = encode_prompts(transformer, input_tokenizer, batch["input"], reserve=max_gen_len)
    eos_ids = as_id_list(cfg.eos_token_id)
    if fast_path_supported(transformer) and _padding_gap_is_safe(transformer, prompt_ids, max_gen_len):
        new_ids = greedy_decode(transformer, prompt_ids, max_gen_len, eos_ids, cfg.pad_token_id)
    else:
        new_ids = hf_generate(transformer, prompt_ids, cfg)
    texts = input_tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    return new_ids, texts


def hf_generate(model, prompt_ids: Sequence[Sequence[int]], cfg) -> list[list[int]]:
    """``model.generate`` on left-padded prompts; new token ids up to and including the first EOS."""
    ids, mask = pad_sequences(prompt_ids, cfg.pad_token_id, "left", model_device(model))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return trim_generated(sequences[:, ids.shape[1]:].cpu(), as_id_list(cfg.eos_token_id))
