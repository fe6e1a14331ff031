"""Scoring pieces both architectures share (decoder-only and encoder-decoder): device and cache
plumbing, prompt encoding and truncation, choice lists and padding, first-token and continuation scores
from a cached prompt, greedy generation settings and trimming. The starter-kit entry points live in
``decoder_functions`` and ``encoder_decoder_functions``.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any, Sequence

import torch

from llm_merging.core.choices import SCORINGS
from llm_merging.core.errors import ConfigError

logger = logging.getLogger(__name__)




def check_scoring(scoring: str) -> str:
    """``scoring`` if it is one of :data:`SCORINGS`, else a one-line ConfigError."""
    if scoring not in SCORINGS:
        raise ConfigError(f"mc_scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    return scoring


NO_LIMIT = 1_000_000


def model_device(model) -> torch.device:
    """Device of the model's input embeddings (the device inputs must go to)."""
    try:
        return model.get_input_embeddings().weight.device
    except Exception:
        return getattr(model, "device", torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def forward_params(cls) -> frozenset:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_owner(model):
    """The model whose ``forward`` signature counts: PEFT wrappers (``get_base_model``) and
    ``torch.compile`` wrappers (``_orig_mod``) pass keyword arguments through to the model they wrap."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
    return model


def cache_kwarg(model) -> str:
    """Name of the cache argument of ``model.forward`` (``cache`` in recent transformers 5.x)."""
    return "cache" if "cache" in forward_params(type(forward_owner(model))) else "past_key_values"


def as_texts(values: Sequence[Any]) -> list[str]:
    return [v if isinstance(v, str) else str(v) for v in values]


def choice_lists(batch: dict) -> list[list[str]]:
    """``batch["answer_choices"]`` as lists of strings (kit CSV strings are parsed)."""
    import ast

    if "answer_choices" not in batch:
        raise ConfigError("multiple-choice batch has no 'answer_choices'")
    out = []
    for choices in batch["answer_choices"]:
        if isinstance(choices, str):
            choices = ast.literal_eval(choices) if choices.strip().startswith("[") else [choices]
        out.append(as_texts(list(choices)))
    return out


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device=None):
    """Pad token id lists into ``(ids, mask)`` LongTensors, on the ``left`` or ``right``."""
    width = max((len(s) for s in seqs), default=0)
    ids, mask = [], []
    for s in seqs:
        s = list(s)
        fill = width - len(s)
        if side == "left":
            ids.append([pad_id] * fill + s)
            mask.append([0] * fill + [1] * len(s))
        else:
            ids.append(s + [pad_id] * fill)
            mask.append([1] * len(s) + [0] * fill)
    shape = (len(seqs), width)
    ids_t = torch.tensor(ids, dtype=torch.long).reshape(shape)
    mask_t = torch.tensor(mask, dtype=torch.long).reshape(shape)
    if device is not None:
        ids_t, mask_t = ids_t.to(device), mask_t.to(device)
    return ids_t, mask_t


def pad_id_of(*tokenizers) -> int:
    for tok in tokenizers:
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tok, attr, None)
            if isinstance(value, int):
                return value
    return 0


def length_limit(model, tokenizer) -> int:
    """Longest sequence the model takes: the smaller of the tokenizer's and the model's limits."""
    limit = NO_LIMIT
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < NO_LIMIT:
        limit = tok_max
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            limit = min(limit, value)
            break
    return limit


def truncate_left(ids: list[int], room: int, keep_first: bool) -> list[int]:
    """Keep the end of ``ids`` (kit prompts end with the question); keep the first token (BOS) if asked."""
    room = max(room, 1)
    if len(ids) <= room:
        return ids
    if keep_first and room > 1:
        return ids[:1] + ids[len(ids) - room + 1:]
    return ids[len(ids) - room:]


def encode_prompts(model, tokenizer, texts, *, reserve: int = 0, keep_first_special: bool = True) -> list[list[int]]:
    """Token ids of each prompt. A prompt that encodes to nothing becomes the BOS (or EOS) token; one
    longer than the model's limit minus ``reserve`` loses its beginning (kit prompts end with the
    question), keeping a leading BOS."""
    ids = [list(x) for x in tokenizer(as_texts(texts))["input_ids"]]
    filler = getattr(tokenizer, "bos_token_id", None)
    if filler is None:
        filler = getattr(tokenizer, "eos_token_id", None)
    room = length_limit(model, tokenizer) - reserve
    bos = getattr(tokenizer, "bos_token_id", None)
    for i, seq in enumerate(ids):
        if not seq:
            ids[i] = [filler if filler is not None else pad_id_of(tokenizer)]
        elif len(seq) > room:
            logger.warning("prompt of %d tokens truncated from the left to %d", len(seq), max(room, 1))
            ids[i] = truncate_left(seq, room, keep_first=keep_first_special and bos is not None and seq[:1] == [bos])
    return ids


def as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(value)]


def greedy_generation_config(model, tokenizer, max_new_tokens: int):
    """Greedy decoding config: the model's own config with sampling switched off, ``max_new_tokens``
    and EOS = the model's EOS ids plus the tokenizer's."""
    from transformers import GenerationConfig

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ConfigError(f"max_gen_len must be a positive integer, got {max_new_tokens!r}")
    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos = as_id_list(cfg.eos_token_id)
    for t in as_id_list(getattr(tokenizer, "eos_token_id", None)):
        if t not in eos:
            eos.append(t)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    cfg.do_sample = False
    cfg.num_beams = 1
    cfg.num_return_sequences = 1
    for attr in ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff",
                 "repetition_penalty", "no_repeat_ngram_size", "suppress_tokens", "begin_suppress_tokens",
                 "bad_words_ids", "sequence_bias", "length_penalty"):  # pure greedy, as the fast path
        if hasattr(cfg, attr):
            setattr(cfg, attr, None)
    cfg.max_new_tokens = max_new_tokens
    cfg.min_new_tokens = None
    cfg.eos_token_id = eos or None
    cfg.pad_token_id = pad
    cfg.return_dict_in_generate = True
    cfg.output_scores = False
    cfg.output_logits = False
    return cfg


def trim_generated(new_ids: torch.Tensor, eos_ids: Sequence[int]) -> list[list[int]]:
    """New token ids per sequence, cut after the first EOS (the padding that follows is dropped)."""
    eos = set(int(e) for e in eos_ids)
    out = []
    for row in new_ids.tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in eos:
                break
        out.append(kept)
    return out


def split_choice_scores(flat_scores: torch.Tensor, counts: Sequence[int]):
    """Split flat choice scores into ``(predicted[B], scores[B, C])`` padded with ``-inf``."""
    width = max(counts, default=0)
    scores = torch.full((len(counts), max(width, 1)), float("-inf"), dtype=torch.float32)
    offset = 0
    for i, n in enumerate(counts):
        scores[i, :n] = flat_scores[offset: offset + n]
        offset += n
    predicted = scores.argmax(dim=1) if width else torch.zeros(len(counts), dtype=torch.long)
    return predicted, scores


# Per-forward cost, in padded choice tokens, used to decide how to split the choice pass into chunks
# of similar length (more chunks: less padding but more forward calls).
CHUNK_OVERHEAD_TOKENS = {"cpu": 128, "cuda": 2048}

# Most (padded) tokens one forward pass takes, per device type; absent: no limit. On a CPU the
# activations of a few hundred tokens stay in the caches, while a batch of long prompts in one forward
# spills them to memory and runs slower per token than one prompt at a time (measured with
# benchmarks/eval_speed.py), so batched prompts are run in pieces of about this size and only the
# cheap passes (answer choices, one-token decoding steps) run the whole batch together.
FORWARD_TOKENS = {"cpu": 1024}


def forward_tokens(device) -> int | None:
    """:data:`FORWARD_TOKENS` of ``device``'s type (None: no limit)."""
    return FORWARD_TOKENS.get(torch.device(device).type)


def chunk_overhead(device) -> int:
    """:data:`CHUNK_OVERHEAD_TOKENS` of ``device``'s type (GPUs' value for other accelerators)."""
    return CHUNK_OVERHEAD_TOKENS.get(torch.device(device).type, CHUNK_OVERHEAD_TOKENS["cuda"])


def plan_chunks(lengths: Sequence[int], overhead: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split rows into chunks of similar length minimising ``sum(rows * longest) + overhead * chunks``.

    Exact dynamic programme over the sorted distinct lengths. With ``max_tokens``, a chunk whose
    ``rows * longest`` exceeds it is then cut into pieces of ``max_tokens // longest`` rows (at least
    one row: a row is never split). Returns lists of row indices, shortest rows first.
    """
    chunks = _plan_chunks(lengths, overhead)
    if max_tokens is None:
        return chunks
    out = []
    for chunk in chunks:
        step = max(1, max_tokens // max(max(lengths[i] for i in chunk), 1))
        out.extend(chunk[k: k + step] for k in range(0, len(chunk), step))
    return out


def _plan_chunks(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    distinct: list[int] = []  # distinct lengths, ascending
    upto: list[int] = []  # number of rows with length <= distinct[g]
    for k, i in enumerate(order):
        if distinct and lengths[i] == distinct[-1]:
            upto[-1] = k + 1
        else:
            distinct.append(lengths[i])
            upto.append(k + 1)
    g = len(distinct)
    best = [0.0] + [float("inf")] * g
    cut = [0] * (g + 1)
    for j in range(1, g + 1):
        rows_j = upto[j - 1]
        for i in range(j):
            cost = best[i] + (rows_j - (upto[i - 1] if i else 0)) * distinct[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], g
    while j > 0:
        i = cut[j]
        bounds.append((upto[i - 1] if i else 0, upto[j - 1]))
        j = i
    return [order[lo:hi] for lo, hi in reversed(bounds)]


def cache_rows(cache, index: torch.Tensor):
    """A cache holding rows ``index`` of ``cache``; ``cache`` itself is left intact (its tensors are
    shared until the new cache's layers are reassigned by indexing and updates)."""
    from transformers import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        new = copy.copy(cache)
        new.self_attention_cache = cache_rows(cache.self_attention_cache, index)
        new.cross_attention_cache = cache_rows(cache.cross_attention_cache, index)
        new.is_updated = dict(cache.is_updated)
        return new
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.batch_select_indices(index)
    return new


def stackable(cache) -> bool:
    """Whether every layer of ``cache`` is a plain key/value layer (:func:`stack_caches` can join it)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None
                                and getattr(layer, "keys").dim() == 4 for layer in layers)


def stack_caches(config, parts: Sequence[tuple[Any, Sequence[int]]], n_rows: int):
    """One ``DynamicCache`` of ``n_rows`` rows from ``(cache, rows)`` parts: row ``rows[k]`` of the result
    is row ``k`` of that part's cache, right-padded with zeros to the longest part (padding that later
    passes mask out, as the padding of one right-padded forward)."""
    from transformers import DynamicCache

    width = max(cache.layers[0].keys.shape[-2] for cache, _ in parts)
    out = DynamicCache(config=config)
    for layer_idx in range(len(parts[0][0].layers)):
        stacked = []
        for attr in ("keys", "values"):
            first = getattr(parts[0][0].layers[layer_idx], attr)
            full = first.new_zeros((n_rows, first.shape[1], width, first.shape[3]))
            for cache, rows in parts:
                t = getattr(cache.layers[layer_idx], attr)
                full[torch.as_tensor(list(rows), device=t.device), :, : t.shape[-2]] = t
            stacked.append(full)
        out.update(stacked[0], stacked[1], layer_idx)
    return out


def with_room(config, cache, extra: int):
    """A transformers ``StaticCache`` holding ``cache``'s keys and values with room for ``extra`` more
    positions, so that decoding writes each new position in place instead of copying the whole cache
    every step (``DynamicCache`` concatenates); ``cache`` itself where it cannot be converted."""
    from transformers import StaticCache

    if not stackable(cache):
        return cache
    width = cache.layers[0].keys.shape[-2]
    try:
        out = StaticCache(config=config, max_cache_len=width + extra)
    except Exception:  # a config StaticCache does not support
        logger.debug("no StaticCache for this model; decoding with the dynamic cache", exc_info=True)
        return cache
    if len(out.layers) != len(cache.layers) or any(layer.is_sliding for layer in out.layers):
        return cache
    for layer_idx, layer in enumerate(cache.layers):
        out.update(layer.keys, layer.values, layer_idx)
    return out


def select_rows(cache, keep: torch.Tensor) -> None:
    """Keep rows ``keep`` of every layer of ``cache`` (in place; also for static layers)."""
    for layer in cache.layers:
        if hasattr(layer, "batch_select_indices"):
            layer.batch_select_indices(keep)
        else:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            if hasattr(layer, "batch_size"):
                layer.batch_size = int(keep.numel())


def first_token_scores(first_logp: torch.Tensor, choice_ids, owner: torch.Tensor) -> torch.Tensor:
    """log p(first choice token) for every choice (0 for an empty choice)."""
    device = first_logp.device
    first = torch.as_tensor([c[0] if len(c) else 0 for c in choice_ids], dtype=torch.long, device=device)
    has = torch.as_tensor([len(c) > 0 for c in choice_ids], dtype=torch.bool, device=device)
    lp = first_logp[owner, first]
    return torch.where(has, lp, torch.zeros_like(lp))


def continuation_scores(choice_ids, owner: torch.Tensor, pad_id: int, device, run) -> torch.Tensor:
    """Sum of log p(choice token t | prompt, tokens < t) over t >= 1, for every choice (flat).

    Choices of two or more tokens are split into chunks of similar length (:func:`plan_chunks`, at
    most :func:`forward_tokens` tokens a chunk); for
    each chunk ``run(rows, ids, mask, need)`` returns logits ``[M, V]`` at the ``need`` positions
    (``ids``/``mask``: the chunk's choice tokens minus the last, right-padded; ``rows``: the chunk's
    owners, i.e. prompt indices). The last choice token is never an input.
    """
    scores = torch.zeros(len(choice_ids), dtype=torch.float32, device=device)
    multi = [i for i, c in enumerate(choice_ids) if len(c) > 1]
    lengths = [len(choice_ids[i]) - 1 for i in multi]
    for chunk in plan_chunks(lengths, chunk_overhead(device), forward_tokens(device)):
        idx = [multi[k] for k in chunk]
        cids, cmask = pad_sequences([choice_ids[i] for i in idx], pad_id, "right", device)
        need = cmask[:, 1:].bool()  # positions whose next token is a real choice token
        rows = owner[torch.as_tensor(idx, device=device)]
        logits = run(rows, cids[:, :-1], cmask[:, :-1], need)
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_lp = logp.gather(-1, cids[:, 1:][need].unsqueeze(-1)).squeeze(-1)
        per_pos = torch.zeros(need.shape, dtype=torch.float32, device=device).masked_scatter(need, token_lp)
        scores[torch.as_tensor(idx, device=device)] = per_pos.sum(-1)
    return scores
