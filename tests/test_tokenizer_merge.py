"""Recipes with tokenizer_source / tokenizer: / chat_template: the merged model and tokenizer (mergekit 0.1.5).

Tiny, offline: a copy of the tiny decoder base and full fine-tunes of it that add tokens (and rows), built
on the fly. Expected tensors are computed independently, token by token, from mergekit's rules.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_merging.model import tiny
from llm_merging.main import main
from llm_merging.model.tokenizer_union import CHAT_TEMPLATES

TEMPLATE_BASE = "{% for m in messages %}BASE {{ m['content'] }}{% endfor %}"
TEMPLATE_A = "{% for m in messages %}A {{ m['role'] }}: {{ m['content'] }}{% endfor %}"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def _make_base(path: Path, tied: bool = False) -> Path:
    """The tiny decoder base, copied, with a chat template (and optionally tied embeddings)."""
    src = tiny.base_dir("decoder")
    model = AutoModelForCausalLM.from_pretrained(str(src))
    tok = AutoTokenizer.from_pretrained(str(src))
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(str(path))
    tok.chat_template = TEMPLATE_BASE
    tok.save_pretrained(str(path))
    return path


def _make_expert(path: Path, base: Path, seed: int, added=(), special=(), template=None) -> Path:
    """A full fine-tune of ``base``: noise on every weight, plus tokens (with random rows) it adds."""
    model = AutoModelForCausalLM.from_pretrained(str(base))
    tok = AutoTokenizer.from_pretrained(str(base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    n_before = len(tok)
    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"extra_special_tokens": list(special)}, replace_extra_special_tokens=False)
    if len(tok) != n_before:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for m in {id(x): x for x in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
                m.weight[n_before:] = torch.randn(m.weight[n_before:].shape, generator=gen)
    if template is not None:
        tok.chat_template = template
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokzoo")
    base = _make_base(root / "base")
    a = _make_expert(root / "a", base, 1, added=["<tool>"], special=["<|sp|>"], template=TEMPLATE_A)
    b = _make_expert(root / "b", base, 2, added=["<tool>", "<other>"])
    c = _make_expert(root / "c", base, 3)  # the base's vocabulary
    tbase = _make_base(root / "tbase", tied=True)
    ta = _make_expert(root / "ta", tbase, 4, added=["<tool>"])
    tb = _make_expert(root / "tb", tbase, 5)
    return {"root": root, "base": base, "a": a, "b": b, "c": c, "tbase": tbase, "ta": ta, "tb": tb}


def _run(tmp_path: Path, doc: dict, name: str = "run") -> tuple[Path, dict]:
    recipe = tmp_path / f"{name}.yml"
    recipe.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out = tmp_path / f"{name}-out"
    assert main(["--recipe", str(recipe), "--output_folder", str(out), "--no-eval", "--quiet", "--device", "cpu"]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    report = json.loads((run_dir / "report.json").read_text())
    return run_dir / "merged_model", report


def _ta_doc(base, experts, weights, lam=0.8, **extra) -> dict:
    doc = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, weights)],
           "parameters": {"normalize": False, "lambda": lam}, "dtype": "float32"}
    doc.update(extra)
    return doc


def _rows_by_rule(out_tok, dirs, weights_of) -> list[torch.Tensor]:
    """Each model's matrix on the output vocabulary, token by token (mergekit's fill rule: own row; else
    the only model's, else the base's, else the mean of the models that have the token). ``dirs[0]`` is
    the base; ``weights_of(dir)`` its vocabulary matrix."""
    toks = [AutoTokenizer.from_pretrained(str(d)) for d in dirs]
    mats = [weights_of(d) for d in dirs]
    out_vocab = out_tok.get_vocab()
    rows = [torch.zeros(len(out_vocab), mats[0].shape[1]) for _ in dirs]
    for token, j in out_vocab.items():
        src = [t.get_vocab().get(token) for t in toks]
        src = [s if s is not None and s < m.shape[0] else None for s, m in zip(src, mats)]
        have = [k for k, s in enumerate(src) if s is not None]
        if len(have) == 1:
            default = mats[have[0]][src[have[0]]]
        elif src[0] is not None:
            default = mats[0][src[0]]
        else:
            default = sum(mats[k][src[k]] for k in have) / len(have)
        for k in range(len(dirs)):
            rows[k][j] = mats[k][src[k]] if src[k] is not None else default
    return rows


def _task_arithmetic(rows, weights, lam):
    base = rows[0]
    return base + lam * sum(w * (r - base) for w, r in zip(weights, rows[1:]))


# --------------------------------------------------------------------------------------------------------
def test_union_task_arithmetic_matches_independent_computation(zoo, tmp_path):
    base, a, b = zoo["base"], zoo["a"], zoo["b"]
    w, lam = [0.6, 0.4], 0.8
    merged, report = _run(tmp_path, _ta_doc(base, [a, b], w, lam, tokenizer_source="union"))

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    base_rows = AutoModelForCausalLM.from_pretrained(str(base)).config.vocab_size
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == base_rows + 3 == model.config.vocab_size == model.get_output_embeddings().weight.shape[0]
    assert len(tok) <= rows
    vocab = tok.get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(str(base)).get_vocab()
    assert all(vocab[t] == i for t, i in base_vocab.items())  # the base's tokens keep their ids
    assert {"<tool>", "<other>", "<|sp|>"} <= set(vocab)
    assert "<|sp|>" in tok.all_special_tokens and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert tok.chat_template == TEMPLATE_BASE  # the source tokenizer's template is kept
    assert tok.convert_ids_to_tokens(tok("x <tool> y")["input_ids"]).count("<tool>") == 1

    got = _weights(merged)
    dirs = [base, a, b]
    for name in (EMBED, HEAD):
        rows_k = _rows_by_rule(tok, dirs, lambda d: _weights(d)[name])
        expected = _task_arithmetic(rows_k, w, lam)
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6)
        ea, eb = _weights(a)[name], _weights(b)[name]
        tok_a, tok_b = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(b))
        # a token only one expert has: exactly that expert's row
        torch.testing.assert_close(got[name][vocab["<|sp|>"]], ea[tok_a.get_vocab()["<|sp|>"]])
        torch.testing.assert_close(got[name][vocab["<other>"]], eb[tok_b.get_vocab()["<other>"]])
        # a token of both experts (not the base's): merged around the mean of their rows
        ra, rb = ea[tok_a.get_vocab()["<tool>"]], eb[tok_b.get_vocab()["<tool>"]]
        mean = (ra + rb) / 2
        torch.testing.assert_close(got[name][vocab["<tool>"]], mean + lam * (w[0] * (ra - mean) + w[1] * (rb - mean)))
        # a base token: the merge of the aligned rows
        j = base_vocab["▁the"] if "▁the" in base_vocab else 300
        bw = _weights(base)[name]
        torch.testing.assert_close(got[name][j], bw[j] + lam * (w[0] * (ea[j] - bw[j]) + w[1] * (eb[j] - bw[j])))
    # every other tensor: the usual task arithmetic
    bw, aw, bbw = _weights(base), _weights(a), _weights(b)
    for name in bw:
        if name not in (EMBED, HEAD):
            torch.testing.assert_close(got[name], bw[name] + lam * (w[0] * (aw[name] - bw[name]) + w[1] * (bbw[name] - bw[name])),
                                       rtol=1e-5, atol=1e-6)
    voc = report["vocabulary"]
    assert voc["tokenizer_source"] == "union" and voc["rows"] == rows and voc["base_rows"] == base_rows
    assert sorted(voc["re_indexed"]) == sorted([EMBED, HEAD]) and voc["identity"] is False
    # the merged model runs with the new tokenizer, new tokens included
    with torch.no_grad():
        logits = model(**tok("a <tool> b <|sp|>", return_tensors="pt")).logits
    assert logits.shape[-1] == rows and torch.isfinite(logits).all()


def test_tokenizer_block_pad_and_chat_template(zoo, tmp_path):
    base, a, b = zoo["base"], zoo["a"], zoo["b"]
    doc = _ta_doc(base, [a, b], [0.5, 0.5], 1.0, tokenizer={"source": "union", "pad_to_multiple_of": 16},
                  chat_template="chatml")
    merged, report = _run(tmp_path, doc)
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    rows = model.config.vocab_size
    base_rows = AutoModelForCausalLM.from_pretrained(str(base)).config.vocab_size
    assert rows % 16 == 0 and rows >= base_rows + 3 and rows == model.get_input_embeddings().weight.shape[0]
    assert len(tok) == base_rows + 3
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    # padding rows: each model's mean token row, merged (linear in the rows: the mean of the merged token rows)
    emb = _weights(merged)[EMBED]
    n = len(tok)
    torch.testing.assert_close(emb[n:], emb[:n].mean(0, keepdim=True).expand(rows - n, -1), rtol=1e-4, atol=1e-5)
    assert report["vocabulary"]["tokens"] == n and report["vocabulary"]["rows"] == rows


def test_source_model_and_chat_template_from_model(zoo, tmp_path):
    base, a, c = zoo["base"], zoo["a"], zoo["c"]
    doc = _ta_doc(base, [a, c], [0.5, 0.5], 1.0, tokenizer_source=str(a), chat_template=str(a))
    merged, _ = _run(tmp_path, doc)
    tok = AutoTokenizer.from_pretrained(str(merged))
    tok_a = AutoTokenizer.from_pretrained(str(a))
    assert tok.get_vocab() == tok_a.get_vocab() and tok.chat_template == TEMPLATE_A
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.config.vocab_size == len(tok_a)
    got = _weights(merged)
    for name in (EMBED, HEAD):
        rows_k = _rows_by_rule(tok, [base, a, c], lambda d: _weights(d)[name])
        torch.testing.assert_close(got[name], _task_arithmetic(rows_k, [0.5, 0.5], 1.0), rtol=1e-5, atol=1e-6)


def test_source_base_drops_the_experts_extra_rows(zoo, tmp_path):
    base, a, c = zoo["base"], zoo["a"], zoo["c"]
    merged, report = _run(tmp_path, _ta_doc(base, [a, c], [0.7, 0.3], 1.0, tokenizer_source="base"))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    base_tok = AutoTokenizer.from_pretrained(str(base))
    n = model.config.vocab_size
    assert n == len(base_tok) == len(tok) == model.get_input_embeddings().weight.shape[0]
    assert "<tool>" not in tok.get_vocab() and tok.chat_template == TEMPLATE_BASE
    got, bw, aw, cw = _weights(merged), _weights(base), _weights(a), _weights(c)
    for name in (EMBED, HEAD):
        torch.testing.assert_close(got[name], bw[name] + 0.7 * (aw[name][:n] - bw[name]) + 0.3 * (cw[name] - bw[name]),
                                   rtol=1e-5, atol=1e-6)
    assert report["vocabulary"]["tokenizer_source"] == "base"


def test_no_tokenizer_choice_keeps_todays_behaviour_and_says_so(zoo, tmp_path):
    base, a = zoo["base"], zoo["a"]
    merged, report = _run(tmp_path, _ta_doc(base, [a], [1.0], 0.5))
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    n = len(AutoTokenizer.from_pretrained(str(base)))
    assert model.config.vocab_size == n and "<tool>" not in tok.get_vocab()
    got, bw, aw = _weights(merged), _weights(base), _weights(a)
    torch.testing.assert_close(got[EMBED], bw[EMBED] + 0.5 * (aw[EMBED][:n] - bw[EMBED]), rtol=1e-5, atol=1e-6)
    voc = report["vocabulary"]
    assert voc["tokenizer_source"] is None and "tokenizer_source" in voc["note"]
    (mism,) = voc["mismatch"].values()
    assert mism[EMBED] == {"base_rows": n, "expert_rows": n + 2}


def test_identical_vocabularies_are_not_reindexed(zoo, tmp_path):
    base, c = zoo["base"], zoo["c"]
    with_tok, report = _run(tmp_path, _ta_doc(base, [c], [1.0], 0.5, tokenizer_source="union"), "union")
    without, report0 = _run(tmp_path, _ta_doc(base, [c], [1.0], 0.5), "plain")
    got, ref = _weights(with_tok), _weights(without)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert report["vocabulary"]["identity"] is True and report["vocabulary"]["re_indexed"] == []
    assert "vocabulary" not in report0


def test_tied_embeddings_aligned_once(zoo, tmp_path):
    tbase, ta, tb = zoo["tbase"], zoo["ta"], zoo["tb"]
    merged, report = _run(tmp_path, _ta_doc(tbase, [ta, tb], [0.5, 0.5], 1.0, tokenizer_source="union"))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(str(tbase))) + 1
    rows_k = _rows_by_rule(tok, [tbase, ta, tb], lambda d: _weights(d)[EMBED])
    torch.testing.assert_close(_weights(merged)[EMBED], _task_arithmetic(rows_k, [0.5, 0.5], 1.0), rtol=1e-5, atol=1e-6)
    assert report["vocabulary"]["re_indexed"] == [EMBED]


def test_lora_expert_with_union(zoo, tmp_path):
    """A LoRA adapter (the base's vocabulary) merged with a full fine-tune that adds tokens."""
    base, a = zoo["base"], zoo["a"]
    lora = tmp_path / "lora"
    shutil.copytree(tiny.lora_expert_dir("decoder", 0), lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    doc = _ta_doc(base, [lora, a], [0.5, 0.5], 1.0, tokenizer_source="union")
    merged, report = _run(tmp_path, doc)
    tok = AutoTokenizer.from_pretrained(str(merged))
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert model.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(str(base))) + 2
    got, aw = _weights(merged), _weights(a)
    tok_a = AutoTokenizer.from_pretrained(str(a))
    for t in ("<tool>", "<|sp|>"):  # only expert a has them (the adapter uses the base's tokenizer)
        torch.testing.assert_close(got[EMBED][tok.get_vocab()[t]], aw[EMBED][tok_a.get_vocab()[t]])
    # base tokens and every other tensor: as the same merge without a tokenizer setting
    ref, ref_report = _run(tmp_path, _ta_doc(base, [lora, a], [0.5, 0.5], 1.0), "ref")
    rw = _weights(ref)
    n = rw[EMBED].shape[0]
    for name in rw:
        torch.testing.assert_close(got[name][:n] if name in (EMBED, HEAD) else got[name], rw[name],
                                   rtol=1e-5, atol=1e-6)
    assert report["vocabulary"]["tokenizer_source"] == "union"
    assert ref_report["vocabulary"]["tokenizer_source"] is None


def test_chat_template_alone_keeps_the_vocabulary(zoo, tmp_path):
    """No tokenizer setting: nothing is re-indexed (mergekit), the base's tokenizer is saved with the template."""
    base, c = zoo["base"], zoo["c"]
    merged, report = _run(tmp_path, _ta_doc(base, [c], [1.0], 0.5, chat_template="chatml"))
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(str(base)).get_vocab()
    assert "vocabulary" not in report


def test_union_run_evaluates_with_the_new_tokenizer(zoo, tmp_path, monkeypatch):
    """End to end with evaluation: the merged model is scored with the output tokenizer."""
    from llm_merging.merging.Merges import Merges

    seen = {}
    original = Merges.predict_multiple_choice

    def spy(self, batch):
        seen["tok"] = self.input_tokenizer
        return original(self, batch)

    monkeypatch.setattr(Merges, "predict_multiple_choice", spy)
    base, a, b = zoo["base"], zoo["a"], zoo["b"]
    recipe = tmp_path / "eval.yml"
    recipe.write_text(yaml.safe_dump(_ta_doc(base, [a, b], [0.5, 0.5], 1.0, tokenizer_source="union")))
    data = [f for f in tiny.sample_data_files() if "cosmos" in f]
    rc = main(["--recipe", str(recipe), "--output_folder", str(tmp_path / "out"), "--quiet", "--device", "cpu",
               "--dataset_filepaths", *data, "--max-examples", "2"])
    assert rc == 0
    assert "<tool>" in seen["tok"].get_vocab() and seen["tok"].padding_side == "left"


def test_align_consume_drops_each_input_once_aligned(zoo):
    """The engine's memory bound: with consume=True each input leaves the list once its result is made."""
    from llm_merging.model.tokenizer_union import build_tokenizer

    plan = build_tokenizer(zoo["base"], [zoo["a"], zoo["b"]], "union")
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(r, 8, generator=gen) for r in plan.source_rows]
    expected = plan.align(list(rows))
    given = list(rows)
    got = plan.align(given, consume=True)
    assert given == [None, None, None]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
