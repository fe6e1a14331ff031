"""Scoring and generation for encoder-decoder models (T5 style), starter-kit compatible.

Kit-compatible entry points:

* ``predict_multiple_choice(transformer, tokenizer, batch)`` -> ``(predicted_choice[B], scores[B, C])``;
* ``generate(transformer, tokenizer, batch, max_gen_len)`` -> ``(ids, texts)``;
* ``tokenize_batch(tokenizer, batch, device)`` -> right-padded tensors.

Multiple choice: score = sum of log p(choice tokens | input), every choice token scored (as the kit
does). The input is encoded once per example; the decoder start step runs once per example (it gives
the first choice token's distribution and fills the cross-attention cache), then that
``EncoderDecoderCache`` is copied to each choice, which runs only its own tokens minus the last one.
"""
from __future__ import annotations

import logging

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.model.scoring import (
    as_id_list,
    as_texts,
    cache_kwarg,
    cache_rows,
    check_scoring,
    choice_lists,
    continuation_scores,
    encode_prompts,
    first_token_scores,
    greedy_generation_config,
    model_device,
    pad_id_of,
    pad_sequences,
    split_choice_scores,
    trim_generated,
)

logger = logging.getLogger(__name__)


def _encode_inputs(transformer, tokenizer, texts):
    return encode_prompts(transformer, tokenizer, texts, keep_first_special=False)


def tokenize_batch(tokenizer, batch, device=None) -> dict:
    """Kit-compatible tokenisation (every key right-padded); the batch is not modified."""
    pad = pad_id_of(tokenizer)
    out: dict[str, torch.Tensor] = {}
    if "input" in batch:
        ids = tokenizer(as_texts(batch["input"]))["input_ids"]
        out["input_ids"], out["input_mask"] = pad_sequences(ids, pad, "right", device)
    if "answer_choices" in batch:
        flat = [c for cs in choice_lists(batch) for c in cs]
        ids = tokenizer(flat)["input_ids"] if flat else []
        out["answer_choices_ids"], out["answer_choices_mask"] = pad_sequences(ids, pad, "right", device)
    if "target" in batch:
        ids = tokenizer(as_texts(batch["target"]))["input_ids"]
        out["target_ids"], out["target_mask"] = pad_sequences(ids, pad, "right", device)
    return out


def _decoder_start_id(model) -> int:
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, "decoder_start_token_id", None) if holder is not None else None
        if value is not None:
            return int(value)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None:
        raise ConfigError("encoder-decoder model has no decoder_start_token_id")
    return int(pad)


def predict_multiple_choice(transformer, tokenizer, batch, *, scoring: str = "exact"):
    """Score every answer choice; returns ``(predicted_choice[B], scores[B, C])`` (CPU, float32,
    ``-inf`` for missing choices). ``scoring`` is accepted for symmetry with the decoder functions:
    the kit's encoder-decoder code already scores every token, so both values agree here."""
    check_scoring(scoring)
    choices = choice_lists(batch)
    counts = [len(cs) for cs in choices]
    input_ids = _encode_inputs(transformer, tokenizer, batch["input"])
    flat = [c for cs in choices for c in cs]
    choice_ids = [list(x) for x in tokenizer(flat)["input_ids"]] if flat else []
    flat_scores = score_choices(transformer, input_ids, choice_ids, counts, pad_id=pad_id_of(tokenizer))
    return split_choice_scores(flat_scores, counts)


@torch.inference_mode()
def score_choices(model, input_ids, choice_ids, counts, *, pad_id: int = 0) -> torch.Tensor:
    """Sum of log p(choice tokens | input) for each choice (flat, grouped by ``counts``); CPU float32."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    device = model_device(model)
    if not choice_ids:
        return torch.zeros(0)
    enc_ids, enc_mask = pad_sequences(input_ids, pad_id, "right", device)
    hidden = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask, return_dict=True).last_hidden_state
    batch_size = enc_ids.shape[0]
    owner = torch.repeat_interleave(torch.arange(batch_size, device=device),
                                    torch.as_tensor(list(counts), device=device))

    # Decoder start step, once per example: the first choice token's distribution, and a cache holding
    # the start token's self-attention entries and the cross-attention keys/values of the input.
    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    cache_kw = cache_kwarg(model)
    start = torch.full((batch_size, 1), _decoder_start_id(model), dtype=torch.long, device=device)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=enc_mask,
                decoder_input_ids=start, use_cache=True, **{cache_kw: cache})
    first_logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)  # [B, V]
    del out

    def run(rows, ids, mask, need):
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[rows]), attention_mask=enc_mask[rows],
                    decoder_input_ids=ids, use_cache=True, **{cache_kw: cache_rows(cache, rows)})
        return out.logits[need]

    scores = continuation_scores(choice_ids, owner, pad_id, device, run)
    scores += first_token_scores(first_logp, choice_ids, owner)
    return scores.cpu()


@torch.inference_mode()
def generate(transformer, tokenizer, batch, max_gen_len):
    """Greedy generation; returns ``(ids, texts)``: the new token ids of each example (up to and
    including its first EOS) and their decoding with special tokens skipped."""
    cfg = greedy_generation_config(transformer, tokenizer, max_gen_len)
    if getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = _decoder_start_id(transformer)
    input_ids = _encode_inputs(transformer, tokenizer, batch["input"])
    ids, mask = pad_sequences(input_ids, pad_id_of(tokenizer), "right", model_device(transformer))
    out = transformer.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    new_ids = trim_generated(sequences[:, 1:].cpu(), as_id_list(cfg.eos_token_id))
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    return new_ids, texts
