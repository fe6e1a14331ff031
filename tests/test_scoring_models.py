"""Scores and generations do not depend on the batch for wrapped models and sliding-window models."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from llm_merging.model import tiny
from llm_merging.model import decoder_functions as df

BATCH = {
    "input": ["The quick brown fox jumps over the lazy dog. According to the above context, choose. Question: what?",
              "A summary is"],
    "answer_choices": [["yes", "no"], ["brown fox", "lazy dog"]],
}


@pytest.fixture(scope="module")
def tokenizers():
    base = str(tiny.base_dir("decoder"))
    tok = AutoTokenizer.from_pretrained(base)
    target = AutoTokenizer.from_pretrained(base)
    target.add_bos_token, target.add_eos_token = False, True
    for t in (tok, target):
        t.pad_token_id = t.eos_token_id
    return tok, target


def _alone(model, tokenizers, i):
    one = {k: v[i:i + 1] for k, v in BATCH.items()}
    return df.predict_multiple_choice(model, *tokenizers, one)[1][0], df.generate(model, *tokenizers, one, 6)[0][0]


def _check_batch_independent(model, tokenizers):
    _, scores = df.predict_multiple_choice(model, *tokenizers, BATCH)
    ids, _ = df.generate(model, *tokenizers, BATCH, 6)
    for i in range(2):
        alone_scores, alone_ids = _alone(model, tokenizers, i)
        torch.testing.assert_close(scores[i], alone_scores, rtol=1e-4, atol=1e-4)
        assert ids[i] == alone_ids


def test_peft_wrapped_model(tokenizers):
    base = str(tiny.base_dir("decoder"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                      str(tiny.lora_expert_dir("decoder", 1))).eval()
    assert df.forward_owner(model) is model.get_base_model()
    _check_batch_independent(model, tokenizers)


def test_sliding_window_shorter_than_the_prompts(tokenizers):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tokenizers[0]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, max_position_embeddings=512)
    model = MistralForCausalLM(cfg).eval()
    assert df.sliding_window(model) == 8
    _check_batch_independent(model, tokenizers)
