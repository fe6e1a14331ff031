"""Multiple-choice scoring and generation on the tiny offline models, and the metrics.

Reference computations here are deliberately naive: one full forward pass per (prompt, choice) pair.
"""
import copy
import os

import pytest
import torch

from llm_merging import metrics
from llm_merging.model import tiny
from llm_merging.core.errors import ConfigError
from llm_merging.model import decoder_functions as df
from llm_merging.model import encoder_decoder_functions as ef

ATOL = 1e-4

PROMPTS = [
    "Question: Which of these is a fruit?\nAnswer:",
    "Hi",
    "The quick brown fox jumps over the lazy dog. According to the above context, what jumps over the dog?",
    "Maria left her umbrella at home this morning. By noon the sky turned dark. What happened?",
    "Options: A. B. C. D.",
    "A summary is",
]
CHOICES = [
    ["apple", "chair", "a big wooden table"],
    ["yes", "no"],
    ["the fox", "dog", "the lazy dog", "None of the above choices .", "A"],
    ["She got wet in the rain .", "B"],
    ["A", "B", "C", "D"],
    ["x"],
]


@pytest.fixture(scope="module")
def decoder():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.base_dir("decoder")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    inp = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    inp.pad_token = inp.eos_token
    tgt = AutoTokenizer.from_pretrained(str(path), padding_side="right", add_bos_token=False, add_eos_token=True)
    tgt.pad_token = tgt.eos_token
    return model, inp, tgt


@pytest.fixture(scope="module")
def encdec():
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = tiny.base_dir("encoder_decoder")
    return AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def _batch(idx):
    return {"input": [PROMPTS[i] for i in idx], "answer_choices": [list(CHOICES[i]) for i in idx]}


def _brute_decoder(model, inp, tgt, prompt, choice, skip_first=False):
    p = inp(prompt)["input_ids"]
    c = tgt(choice)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
    start = 1 if skip_first else 0
    return sum(logp[len(p) - 1 + j, c[j]].item() for j in range(start, len(c)))


def _brute_encdec(model, tok, prompt, choice):
    enc = tok(prompt, return_tensors="pt")
    labels = torch.tensor([tok(choice)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(**enc, labels=labels).logits[0].float(), -1)
    return sum(logp[j, labels[0, j]].item() for j in range(labels.shape[1]))


def _check_shape(pred, scores, idx):
    width = max(len(CHOICES[i]) for i in idx)
    assert pred.dtype == torch.long and pred.shape == (len(idx),)
    assert scores.shape == (len(idx), width)
    for row, i in enumerate(idx):
        assert torch.isinf(scores[row, len(CHOICES[i]):]).all()
        assert torch.isfinite(scores[row, : len(CHOICES[i])]).all()


# ----------------------------------------------------------------------------------- decoder scoring

def test_decoder_exact_scores_equal_brute_force(decoder):
    model, inp, tgt = decoder
    idx = list(range(len(PROMPTS)))
    pred, scores = df.predict_multiple_choice(model, inp, tgt, _batch(idx))
    _check_shape(pred, scores, idx)
    for row, i in enumerate(idx):
        expected = [_brute_decoder(model, inp, tgt, PROMPTS[i], c) for c in CHOICES[i]]
        assert scores[row, : len(expected)].tolist() == pytest.approx(expected, abs=ATOL)
        assert pred[row].item() == max(range(len(expected)), key=expected.__getitem__)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 6])
def test_decoder_batched_equals_one_at_a_time(decoder, batch_size):
    model, inp, tgt = decoder
    order = [2, 1, 5, 0, 4, 3]  # mixed prompt lengths, choice counts and choice lengths in every batch
    single = {i: df.predict_multiple_choice(model, inp, tgt, _batch([i]))[1][0, : len(CHOICES[i])] for i in order}
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        pred, scores = df.predict_multiple_choice(model, inp, tgt, _batch(idx))
        for row, i in enumerate(idx):
            assert torch.allclose(scores[row, : len(CHOICES[i])], single[i], atol=ATOL)
            assert pred[row].item() == single[i].argmax().item()


def test_decoder_starter_kit_scoring_skips_first_token(decoder):
    model, inp, tgt = decoder
    idx = [0, 2, 3]
    _, exact = df.predict_multiple_choice(model, inp, tgt, _batch(idx))
    _, kit = df.predict_multiple_choice(model, inp, tgt, _batch(idx), scoring="starter_kit")
    for row, i in enumerate(idx):
        for j, c in enumerate(CHOICES[i]):
            assert kit[row, j].item() == pytest.approx(_brute_decoder(model, inp, tgt, PROMPTS[i], c, skip_first=True), abs=ATOL)
            first = exact[row, j].item() - kit[row, j].item()
            assert first < 0  # the first token's log-probability, which the kit never counts


def test_exact_and_starter_kit_differ_on_single_token_choices(decoder):
    """Choices that are one token each (no EOS appended): the kit's rule scores nothing, so every
    choice gets 0 and it always predicts choice 0; exact scoring ranks them by p(token | prompt)."""
    model, inp, _ = decoder
    tgt = copy.deepcopy(inp)
    tgt.add_bos_token, tgt.add_eos_token, tgt.padding_side = False, False, "right"
    choices = ["A", "the", "dog"]
    assert all(len(tgt(c)["input_ids"]) == 1 for c in choices)
    prompts = ["Options: A. B. C. D.", "The quick brown fox jumps over the lazy", "Hi"]
    batch = {"input": prompts, "answer_choices": [choices] * len(prompts)}
    pred_kit, kit = df.predict_multiple_choice(model, inp, tgt, batch, scoring="starter_kit")
    pred, exact = df.predict_multiple_choice(model, inp, tgt, batch)
    assert torch.count_nonzero(kit) == 0 and pred_kit.tolist() == [0, 0, 0]
    for row, p in enumerate(prompts):
        ids = inp(p)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        expected = [logp[tgt(c)["input_ids"][0]].item() for c in choices]
        assert exact[row].tolist() == pytest.approx(expected, abs=ATOL)
    assert pred.tolist() != pred_kit.tolist()


def test_decoder_accepts_kit_csv_choice_strings_and_rejects_unknown_scoring(decoder):
    model, inp, tgt = decoder
    pred, scores = df.predict_multiple_choice(model, inp, tgt, {"input": [PROMPTS[1]], "answer_choices": ["['yes', 'no']"]})
    _, ref = df.predict_multiple_choice(model, inp, tgt, _batch([1]))
    assert torch.allclose(scores, ref)
    with pytest.raises(ConfigError):
        df.predict_multiple_choice(model, inp, tgt, _batch([1]), scoring="nope")


def test_decoder_tokenize_batch_is_kit_shaped_and_leaves_batch_alone(decoder):
    _, inp, tgt = decoder
    batch = {"input": PROMPTS[:2], "answer_choices": [["a", "b"], ["c", "dd"]], "target": ["a", 3]}
    before = copy.deepcopy(batch)
    out = df.tokenize_batch(inp, tgt, batch, "cpu")
    assert batch == before
    assert out["input_ids"].shape[0] == 2 and out["answer_choices_ids"].shape[0] == 4
    assert out["input_mask"][:, -1].tolist() == [1, 1]  # left padding: every prompt ends at the right edge
    assert out["answer_choices_mask"][:, 0].tolist() == [1, 1, 1, 1]  # right padding


def test_plan_chunks_covers_every_row_once():
    lengths = [1, 7, 2, 2, 30, 31, 3, 50, 2]
    for overhead in (0, 4, 64, 10_000):
        chunks = df.plan_chunks(lengths, overhead)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert df.plan_chunks(lengths, 10_000) == [sorted(range(len(lengths)), key=lengths.__getitem__)]
    assert len(df.plan_chunks(lengths, 0)) == len(set(lengths))


def test_plan_chunks_token_cap():
    lengths = [1, 7, 2, 2, 30, 31, 3, 50, 2]
    for cap in (1, 10, 40, 60):
        chunks = df.plan_chunks(lengths, 10_000, cap)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
        for c in chunks:  # within the cap, or a single row longer than it
            assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= cap
    assert df.plan_chunks(lengths, 10_000, 10_000) == df.plan_chunks(lengths, 10_000)


@pytest.mark.parametrize("budget", [1, 24, 64])
def test_decoder_prompts_in_pieces_equal_brute_force(decoder, monkeypatch, budget):
    """A token budget per forward (CPUs) runs the prompts in pieces and joins their caches: same scores
    as the naive computation, same generated tokens as one prompt at a time."""
    model, inp, tgt = decoder
    monkeypatch.setitem(df.FORWARD_TOKENS, "cpu", budget)
    idx = [2, 1, 5, 0, 4, 3]
    pred, scores = df.predict_multiple_choice(model, inp, tgt, _batch(idx))
    _check_shape(pred, scores, idx)
    for row, i in enumerate(idx):
        expected = [_brute_decoder(model, inp, tgt, PROMPTS[i], c) for c in CHOICES[i]]
        assert scores[row, : len(expected)].tolist() == pytest.approx(expected, abs=ATOL)
    ids, texts = df.generate(model, inp, tgt, {"input": PROMPTS}, 6)
    monkeypatch.setitem(df.FORWARD_TOKENS, "cpu", 1_000_000)
    for i, p in enumerate(PROMPTS):
        assert df.generate(model, inp, tgt, {"input": [p]}, 6)[0][0] == ids[i]


def test_stack_caches_places_rows_and_pads_with_zeros():
    from transformers import DynamicCache, LlamaConfig

    cfg = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                      intermediate_size=16, vocab_size=11)
    parts = []
    for rows, width in (([2, 0], 3), ([1], 5)):
        cache = DynamicCache(config=cfg)
        for layer in range(2):
            k = torch.randn(len(rows), 1, width, 4)
            cache.update(k, k + 1, layer)
        parts.append((cache, rows))
    assert df.stackable(parts[0][0])
    joined = df.stack_caches(cfg, parts, 3)
    for layer in range(2):
        keys, values = joined.layers[layer].keys, joined.layers[layer].values
        assert keys.shape == (3, 1, 5, 4) and torch.equal(values[:, :, :3], keys[:, :, :3] + 1)
        for cache, rows in parts:
            src = cache.layers[layer].keys
            for k, r in enumerate(rows):
                assert torch.equal(keys[r, :, : src.shape[-2]], src[k])
                assert not keys[r, :, src.shape[-2]:].any() and not values[r, :, src.shape[-2]:].any()


# ----------------------------------------------------------------------------- encoder-decoder scoring

def test_encdec_scores_equal_brute_force_and_batch_independent(encdec):
    model, tok = encdec
    idx = [2, 1, 5, 0, 4, 3]
    pred, scores = ef.predict_multiple_choice(model, tok, _batch(idx))
    _check_shape(pred, scores, idx)
    for row, i in enumerate(idx):
        expected = [_brute_encdec(model, tok, PROMPTS[i], c) for c in CHOICES[i]]
        assert scores[row, : len(expected)].tolist() == pytest.approx(expected, abs=ATOL)
    for batch_size in (1, 4):
        for start in range(0, len(idx), batch_size):
            sub = idx[start: start + batch_size]
            _, part = ef.predict_multiple_choice(model, tok, _batch(sub))
            for row, i in enumerate(sub):
                n = len(CHOICES[i])
                assert torch.allclose(part[row, :n], scores[idx.index(i), :n], atol=ATOL)


def test_encdec_generate_batched_equals_single(encdec):
    model, tok = encdec
    batch = {"input": PROMPTS[:4]}
    ids, texts = ef.generate(model, tok, batch, 6)
    assert len(ids) == len(texts) == 4 and all(len(x) <= 6 for x in ids)
    for i in range(4):
        ids1, texts1 = ef.generate(model, tok, {"input": [PROMPTS[i]]}, 6)
        assert ids1[0] == ids[i] and texts1[0] == texts[i]
    assert texts == tok.batch_decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ generation

def test_decoder_generate_batched_equals_single_and_hf_generate(decoder):
    model, inp, tgt = decoder
    batch = {"input": PROMPTS}
    ids, texts = df.generate(model, inp, tgt, batch, 7)
    assert all(len(x) == 7 for x in ids)  # the tiny model never says EOS here
    for i, p in enumerate(PROMPTS):
        ids1, texts1 = df.generate(model, inp, tgt, {"input": [p]}, 7)
        assert ids1[0] == ids[i] and texts1[0] == texts[i]
    cfg = df.greedy_generation_config(model, inp, 7)
    reference = df.hf_generate(model, [inp(p)["input_ids"] for p in PROMPTS], cfg)  # transformers, left padding
    assert reference == ids
    assert texts == inp.batch_decode(ids, skip_special_tokens=True)


def test_decoder_generation_stops_at_eos_per_sequence(decoder):
    model, inp, _ = decoder
    prompts = [inp(p)["input_ids"] for p in PROMPTS[:4]]
    free = df.greedy_decode(model, prompts, 8, [], pad_id=2)
    stop = free[0][2]  # pretend the third token of the first sequence is EOS
    got = df.greedy_decode(model, prompts, 8, [stop], pad_id=2)
    for seq, full in zip(got, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert seq == full[:cut]
    assert len(got[0]) == 3
    cfg = df.greedy_generation_config(model, inp, 8)
    cfg.eos_token_id = [stop]
    assert df.hf_generate(model, prompts, cfg) == got


def test_decoder_generate_falls_back_to_transformers_generate(decoder, monkeypatch):
    model, inp, tgt = decoder
    fast = df.generate(model, inp, tgt, {"input": PROMPTS[:3]}, 5)
    monkeypatch.setattr(df, "fast_path_supported", lambda m: False)
    assert df.generate(model, inp, tgt, {"input": PROMPTS[:3]}, 5) == fast
    with pytest.raises(ConfigError):
        df.generate(model, inp, tgt, {"input": PROMPTS[:1]}, 0)


# --------------------------------------------------------------------------------------------- metrics

def test_accuracy_on_known_predictions():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 0]) == 0.5
    assert metrics.accuracy([1], [1]) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy([1, 2], [1])


def test_rouge_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    preds = ["A council has agreed to plant trees.", "the cat sat on the mat\nit was happy", "", "Running dogs ran"]
    refs = ["The council agreed to plant two thousand trees along a river.", "The cat sat.\nIt was very happy today",
            "Something", "a dog runs"]
    got = metrics.rouge(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    per = [scorer.score(r, p) for r, p in zip(refs, preds)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in per) / len(per), abs=1e-12)
    # rougeLsum splits on newlines (as `evaluate` does), so it differs from rougeL on multi-line text
    swapped = metrics.rouge(["c d\na b"], ["a b\nc d"])
    assert swapped["rougeL"] == pytest.approx(0.5) and swapped["rougeLsum"] == pytest.approx(1.0)
    # no stemming: "dogs"/"dog" and "ran"/"runs" do not match
    assert metrics.rouge(["Running dogs ran"], ["running dog runs"])["rouge1"] == pytest.approx(1 / 3)


# ------------------------------------------------------------- another architecture: GPT-2 (no BOS)

GPT2_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "shared", "data", "real_adapters", "gpt2", "base_config")


@pytest.mark.skipif(not os.path.isdir(GPT2_CONFIG), reason="GPT-2 tokenizer/config not available")
def test_gpt2_absolute_positions_and_tokenizer_without_bos():
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config.from_pretrained(GPT2_CONFIG)
    cfg.n_layer, cfg.n_embd, cfg.n_head = 2, 64, 4
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    inp = AutoTokenizer.from_pretrained(GPT2_CONFIG, padding_side="left")
    inp.pad_token = inp.eos_token
    tgt = copy.deepcopy(inp)
    tgt.padding_side, tgt.add_bos_token, tgt.add_eos_token = "right", False, True
    idx = [0, 1, 2, 3]
    _, scores = df.predict_multiple_choice(model, inp, tgt, _batch(idx))
    for row, i in enumerate(idx):
        expected = [_brute_decoder(model, inp, tgt, PROMPTS[i], c) for c in CHOICES[i]]
        assert scores[row, : len(expected)].tolist() == pytest.approx(expected, abs=ATOL)
    prompts = PROMPTS[:3] + [""]  # an empty prompt encodes to nothing with GPT-2: it becomes EOS
    ids, _ = df.generate(model, inp, tgt, {"input": prompts}, 5)
    cfg_gen = df.greedy_generation_config(model, inp, 5)
    assert ids == df.hf_generate(model, [inp(p)["input_ids"] or [inp.eos_token_id] for p in prompts], cfg_gen)
