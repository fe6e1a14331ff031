"""Output tokenizer of a merge (mergekit 0.1.5's tokenizer_source / tokenizer: rules) and row alignment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from transformers import AutoTokenizer  # noqa: E402

from llm_merging.core.errors import ConfigError, MergeError, ModelNotFoundError  # noqa: E402
from llm_merging.model.tokenizer_union import TokenSource, align_rows, build_tokenizer  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>"]
BASE_WORDS = ["a", "b", "c", "d", "ab"]
TEMPLATE_BASE = "{% for m in messages %}BASE {{ m['content'] }}{% endfor %}"
TEMPLATE_E1 = "{% for m in messages %}E1 {{ m['role'] }}: {{ m['content'] }}{% endfor %}"


def make_tokenizer(words, added=(), special=(), template=None, merges=(("a", "b"),)):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(words))}
    merges = [m for m in merges if all(p in vocab for p in m) and "".join(m) in vocab]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"extra_special_tokens": list(special)}, replace_extra_special_tokens=False)
    if template:
        tok.chat_template = template
    return tok


def make_model(path: Path, words, *, added=(), special=(), template=None, rows=None, adapter=False,
               tokenizer=True, merges=(("a", "b"),)) -> Path:
    """A model directory: a tokenizer plus a config.json giving its vocabulary rows (or an adapter config)."""
    path.mkdir(parents=True, exist_ok=True)
    n = len(SPECIALS) + len(words) + len(added) + len(special)
    if tokenizer:
        make_tokenizer(words, added, special, template, merges).save_pretrained(str(path))
    if adapter:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    else:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                          "vocab_size": rows or n}))
    return path


@pytest.fixture
def trio(tmp_path):
    """Base; expert 1 with an extra word, an added token and an added special token; expert 2 lacking 'd'
    with two extra words (one shared with expert 1), in a different id order."""
    base = make_model(tmp_path / "base", BASE_WORDS, template=TEMPLATE_BASE)
    e1 = make_model(tmp_path / "e1", BASE_WORDS + ["x"], added=["<tool>"], special=["<|sp|>"], template=TEMPLATE_E1)
    e2 = make_model(tmp_path / "e2", ["y", "c", "b", "a", "x", "ab"])
    return base, e1, e2


def rows_for(plan, seed=0, hidden=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, hidden, generator=g) for r in plan.source_rows]


def row(mat, tok, token):
    return mat[tok.get_vocab()[token]]


# --------------------------------------------------------------------------------------------------------
# union
# --------------------------------------------------------------------------------------------------------
def test_union_order_keeps_base_ids_then_new_tokens_then_added(trio):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2])
    vocab = plan.tokenizer.get_vocab()
    base_vocab = AutoTokenizer.from_pretrained(str(base)).get_vocab()
    assert {t: vocab[t] for t in base_vocab} == base_vocab  # the base's tokens keep their ids
    n = len(base_vocab)
    # regular tokens the base lacks (model order), then the models' added tokens
    assert [vocab[t] for t in ("x", "y", "<tool>", "<|sp|>")] == [n, n + 1, n + 2, n + 3]
    assert plan.n_tokens == plan.vocab_size == n + 4 == len(plan.tokenizer)
    for name, tokdir, imap in zip(plan.names, (base, e1, e2), plan.index_maps):
        own = AutoTokenizer.from_pretrained(str(tokdir)).get_vocab()
        for t, j in vocab.items():
            assert int(imap[j]) == own.get(t, -1), (name, t)
    assert not plan.is_identity


def test_align_fill_rule(trio):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2])
    toks = [AutoTokenizer.from_pretrained(str(p)) for p in trio]
    mats = rows_for(plan)
    out = plan.align(mats)
    tok = plan.tokenizer
    assert all(o.shape == (plan.vocab_size, 4) for o in out)
    # every model keeps its own row for a token it has
    for o, m, t in zip(out, mats, toks):
        for token in ("a", "ab", "c", "<s>"):
            assert torch.equal(row(o, tok, token), row(m, t, token))
    # in one model only (expert 1's added tokens): that model's row everywhere
    for token in ("<tool>", "<|sp|>"):
        for o in out:
            assert torch.equal(row(o, tok, token), row(mats[1], toks[1], token))
    # in expert 2 only
    for o in out:
        assert torch.equal(row(o, tok, "y"), row(mats[2], toks[2], "y"))
    # in the base and expert 1, not expert 2: expert 2 gets the base's row
    assert torch.equal(row(out[2], tok, "d"), row(mats[0], toks[0], "d"))
    assert torch.equal(row(out[1], tok, "d"), row(mats[1], toks[1], "d"))
    # in both experts, not the base: the base gets their mean; the experts keep their own
    mean = (row(mats[1], toks[1], "x") + row(mats[2], toks[2], "x")) / 2
    assert torch.allclose(row(out[0], tok, "x"), mean)
    assert torch.equal(row(out[1], tok, "x"), row(mats[1], toks[1], "x"))
    assert torch.equal(row(out[2], tok, "x"), row(mats[2], toks[2], "x"))


def test_align_without_base_weight_averages(trio):
    """A model missing the weight (None) is left out: with no base, a token two experts share but one
    model lacks takes their mean."""
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2])
    toks = [AutoTokenizer.from_pretrained(str(p)) for p in trio]
    mats = rows_for(plan, seed=3)
    out = plan.align([None, mats[1], mats[2]])
    assert out[0] is None
    tok = plan.tokenizer
    assert torch.equal(row(out[1], tok, "a"), row(mats[1], toks[1], "a"))  # both have it: own rows
    assert torch.equal(row(out[2], tok, "d"), row(mats[1], toks[1], "d"))  # expert 1 only, now
    assert torch.equal(row(out[1], tok, "y"), row(mats[2], toks[2], "y"))
    # three experts, no base weight: a token two of them share is their mean for the third
    e3 = make_model(base.parent / "e3", ["a", "b", "c"])
    plan = build_tokenizer(base, [e1, e2, e3])
    toks.append(AutoTokenizer.from_pretrained(str(e3)))
    mats = rows_for(plan, seed=4)
    out = plan.align([None] + mats[1:])
    mean = (row(mats[1], toks[1], "x") + row(mats[2], toks[2], "x")) / 2
    assert torch.allclose(row(out[3], plan.tokenizer, "x"), mean)
    with_base = plan.align(mats)
    assert torch.equal(row(with_base[3], plan.tokenizer, "d"), row(mats[0], toks[0], "d"))


def test_added_and_special_tokens_survive_save_and_load(trio, tmp_path):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2])
    out_dir = tmp_path / "merged"
    plan.save(out_dir)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    assert tok.get_vocab() == plan.tokenizer.get_vocab()
    by_content = {info.content: info for info in tok.added_tokens_decoder.values()}
    assert by_content["<|sp|>"].special and not by_content["<tool>"].special
    assert "<|sp|>" in tok.all_special_tokens
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    ids = tok("a <tool> <|sp|> y", add_special_tokens=False)["input_ids"]
    v = tok.get_vocab()
    assert ids == [v["a"], v["<tool>"], v["<|sp|>"], v["y"]]
    assert "<|sp|>" not in tok.decode(ids, skip_special_tokens=True)
    assert tok.chat_template == TEMPLATE_BASE


def test_pad_to_multiple_of(trio):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2], pad_to_multiple_of=16)
    n = len(plan.tokenizer)
    assert plan.n_tokens == n == 12 and plan.vocab_size == 16
    assert all(len(m) == 16 and (m[n:] == -1).all() for m in plan.index_maps)
    out = plan.align(rows_for(plan))
    for o in out:
        assert o.shape == (16, 4)
        assert torch.allclose(o[n:], o[:n].mean(0).expand(16 - n, 4))
    assert build_tokenizer(base, [e1, e2], pad_to_multiple_of=4).vocab_size == 12  # already a multiple
    with pytest.raises(ConfigError):
        build_tokenizer(base, [e1], pad_to_multiple_of=0)


# --------------------------------------------------------------------------------------------------------
# source=base / source=<model>, tokens:, chat templates
# --------------------------------------------------------------------------------------------------------
def test_source_base(trio):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2], source="base")
    base_tok = AutoTokenizer.from_pretrained(str(base))
    assert plan.tokenizer.get_vocab() == base_tok.get_vocab()
    assert plan.vocab_size == len(base_tok)
    toks = [AutoTokenizer.from_pretrained(str(p)) for p in trio]
    mats = rows_for(plan)
    out = plan.align(mats)
    assert torch.equal(out[0], mats[0])
    assert torch.equal(out[1], mats[1][: plan.vocab_size])  # expert 1's extra rows are dropped
    assert torch.equal(row(out[2], plan.tokenizer, "d"), row(mats[0], toks[0], "d"))
    assert torch.equal(row(out[2], plan.tokenizer, "b"), row(mats[2], toks[2], "b"))


def test_source_model(trio):
    base, e1, e2 = trio
    plan = build_tokenizer(base, [e1, e2], source=str(e1))
    e1_tok = AutoTokenizer.from_pretrained(str(e1))
    assert plan.tokenizer.get_vocab() == e1_tok.get_vocab()
    assert plan.tokenizer.chat_template == TEMPLATE_E1
    assert torch.equal(plan.index_maps[1], torch.arange(plan.vocab_size))
    toks = [AutoTokenizer.from_pretrained(str(p)) for p in trio]
    mats = rows_for(plan)
    out = plan.align(mats)
    assert torch.equal(out[1], mats[1])
    mean = (row(mats[1], toks[1], "x") + row(mats[2], toks[2], "x")) / 2
    assert torch.allclose(row(out[0], plan.tokenizer, "x"), mean)
    assert "y" not in plan.tokenizer.get_vocab()
    with pytest.raises(ConfigError, match="not 'union', 'base'"):
        build_tokenizer(base, [e1], source="nowhere/at/all")


def test_token_overrides(trio):
    base, e1, e2 = trio
    tokens = {
        "x": {"source": str(e2), "force": True},
        "y": {"source": {"kind": "model_token", "model": str(base), "token": "a"}},
        "<tool>": {"source": {"kind": "model_token", "model": str(e2), "token_id": 0}},
        "<new>": {"source": {"kind": "zero"}},
        "<new2>": None,
        "a": {"source": str(e1)},  # everyone has it and no force: a no-op
    }
    plan = build_tokenizer(base, [e1, e2], tokens=tokens)
    tok = plan.tokenizer
    assert "<new>" in tok.get_vocab() and "<new2>" in tok.get_vocab()
    toks = [AutoTokenizer.from_pretrained(str(p)) for p in trio]
    mats = rows_for(plan)
    out = plan.align(mats)
    for k, o in enumerate(out):
        assert torch.equal(row(o, tok, "x"), row(mats[2], toks[2], "x"))  # forced: everyone
        assert torch.equal(row(o, tok, "a"), row(mats[k], toks[k], "a"))
        assert torch.equal(row(o, tok, "<new>"), torch.zeros(4))
        assert torch.equal(row(o, tok, "<new2>"), torch.zeros(4))  # in no model
    assert torch.equal(row(out[2], tok, "y"), row(mats[2], toks[2], "y"))  # has it: keeps it
    for k in (0, 1):
        assert torch.equal(row(out[k], tok, "y"), row(mats[0], toks[0], "a"))
    for k in (0, 2):
        assert torch.equal(row(out[k], tok, "<tool>"), mats[2][0])
    assert torch.equal(row(out[1], tok, "<tool>"), row(mats[1], toks[1], "<tool>"))

    bad = [
        ({"x": {"source": "/no/such/model"}}, "not the base or one of the models"),
        ({"x": {"source": {"kind": "model_token", "model": str(e1)}}}, "exactly one of"),
        ({"x": {"source": {"kind": "model_token", "model": str(e1), "token": "zzz"}}}, "not in the tokenizer"),
        ({"x": {"source": {"kind": "mean"}}}, "source kind"),
        ({"x": {"sauce": str(e1)}}, "unknown key"),
        ({"x": {"force": "yes"}}, "force"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ConfigError, match=msg) as ei:
            build_tokenizer(base, [e1, e2], tokens=cfg)
        assert "\n" not in str(ei.value)
    # a source model that lacks the token (or the weight) cannot give a row
    plan = build_tokenizer(base, [e1, e2], tokens={"<tool>": {"source": str(base)}})
    with pytest.raises(MergeError, match="lacks that token"):
        plan.align(rows_for(plan))
    plan = build_tokenizer(base, [e1, e2], tokens={"<tool>": {"source": str(e1)}})
    with pytest.raises(MergeError, match="lacks this weight"):
        plan.align([m if k != 1 else None for k, m in enumerate(rows_for(plan))])


def test_chat_template(trio):
    base, e1, e2 = trio
    assert build_tokenizer(base, [e1, e2]).tokenizer.chat_template == TEMPLATE_BASE
    custom = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    assert build_tokenizer(base, [e1, e2], chat_template=custom).tokenizer.chat_template == custom
    assert build_tokenizer(base, [e1, e2], chat_template=str(e1)).tokenizer.chat_template == TEMPLATE_E1
    assert "<|im_start|>" in build_tokenizer(base, [e1], chat_template="chatml").tokenizer.chat_template
    e3 = make_model(base.parent / "e3", BASE_WORDS, template=TEMPLATE_E1)
    assert build_tokenizer(base, [e1, e3], chat_template="auto").tokenizer.chat_template == TEMPLATE_E1
    with pytest.raises(ConfigError, match="has no chat template"):
        build_tokenizer(base, [e1, e2], chat_template=str(e2))
    with pytest.raises(ConfigError, match="is not a template"):
        build_tokenizer(base, [e1], chat_template="vicuna")
    plan = build_tokenizer(base, [e1], chat_template=custom)
    out = base.parent / "saved"
    plan.save(out)
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == custom


# --------------------------------------------------------------------------------------------------------
# identity, adapters, stripping
# --------------------------------------------------------------------------------------------------------
def test_identical_tokenizers_are_identity(tmp_path):
    base = make_model(tmp_path / "base", BASE_WORDS)
    e1 = make_model(tmp_path / "e1", BASE_WORDS)
    lora = make_model(tmp_path / "lora", BASE_WORDS, adapter=True, tokenizer=False)
    for source in ("union", "base", str(e1)):
        plan = build_tokenizer(base, [e1, lora], source=source)
        assert plan.is_identity, source
        mats = rows_for(plan)
        assert all(torch.equal(o, m) for o, m in zip(plan.align(mats), mats))
    assert not build_tokenizer(base, [e1], pad_to_multiple_of=16).is_identity
    assert not build_tokenizer(base, [e1], tokens={"a": {"force": True}}).is_identity
    # the config has more rows than the tokenizer (padding rows): the output drops them, as mergekit does
    padded = make_model(tmp_path / "padded", BASE_WORDS, rows=16)
    plan = build_tokenizer(base, [padded])
    assert plan.vocab_size == 8 and plan.source_rows == [8, 16] and not plan.is_identity


def test_adapter_with_and_without_tokenizer(tmp_path):
    base = make_model(tmp_path / "base", BASE_WORDS)
    plain = make_model(tmp_path / "plain", BASE_WORDS, adapter=True, tokenizer=False)
    own = make_model(tmp_path / "own", BASE_WORDS, added=["<im>"], adapter=True)
    plan = build_tokenizer(base, [plain, own])
    assert plan.source_rows == [8, 8, 9]
    assert torch.equal(plan.index_maps[1], plan.index_maps[0])
    v = plan.tokenizer.get_vocab()
    assert v["<im>"] == 8 and int(plan.index_maps[2][8]) == 8 and int(plan.index_maps[0][8]) == -1
    mats = rows_for(plan)
    out = plan.align(mats)
    assert all(torch.equal(o[8], mats[2][8]) for o in out)


def test_base_tokens_beyond_its_rows_are_stripped(tmp_path):
    """Tokens whose id is >= config.vocab_size have no row: mergekit removes them (and their merges)."""
    words = ["a", "b", "c", "d", "ab", "cd"]
    base = make_model(tmp_path / "base", words, rows=8, merges=(("a", "b"), ("c", "d")))
    e1 = make_model(tmp_path / "e1", words + ["z"], rows=9, added=["<big>"], merges=(("a", "b"), ("c", "d")))
    plan = build_tokenizer(base, [e1], source="base")
    vocab = plan.tokenizer.get_vocab()
    assert "cd" not in vocab and len(vocab) == 8 and plan.vocab_size == 8
    assert plan.tokenizer("ab cd", add_special_tokens=False)["input_ids"] == [vocab["ab"], vocab["c"], vocab["d"]]
    plan = build_tokenizer(base, [e1])
    vocab = plan.tokenizer.get_vocab()
    # 'cd' comes back from expert 1 (id 8 < its 9 rows), appended; 'z' and '<big>' are beyond its rows
    assert vocab["cd"] == 8 and "z" not in vocab and "<big>" not in vocab and plan.vocab_size == 9
    mats = rows_for(plan)
    out = plan.align(mats)
    assert all(torch.equal(o[8], mats[1][8]) for o in out)


def test_tiny_models_share_one_vocabulary():
    from llm_merging.model import tiny

    plan = build_tokenizer(tiny.base_dir(), [tiny.full_expert_dir(index=0), tiny.lora_expert_dir(index=0)])
    assert plan.is_identity and plan.vocab_size == len(AutoTokenizer.from_pretrained(str(tiny.base_dir())))


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------
def test_errors_are_one_line(tmp_path, trio):
    base, e1, e2 = trio
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text("{}")
    (broken / "config.json").write_text(json.dumps({"vocab_size": 8}))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"vocab_size": 99}))
    cases = [
        (lambda: build_tokenizer(tmp_path / "missing", [e1]), ModelNotFoundError, "does not exist"),
        (lambda: build_tokenizer(base, [tmp_path / "missing"]), ModelNotFoundError, "does not exist"),
        (lambda: build_tokenizer(bare, [e1]), ModelNotFoundError, "has no tokenizer"),
        (lambda: build_tokenizer(base, [broken]), ModelNotFoundError, "cannot load the tokenizer of model"),
        (lambda: build_tokenizer(base, [bare]), ModelNotFoundError, "no tokenizer and its vocabulary"),
        (lambda: build_tokenizer(base, [e1], source=""), ConfigError, "tokenizer source"),
        (lambda: build_tokenizer(base, [e1], tokens=["x"]), ConfigError, "tokens must be a mapping"),
    ]
    for fn, cls, msg in cases:
        with pytest.raises(cls, match=msg) as ei:
            fn()
        assert "\n" not in str(ei.value)
    assert str(broken) in str(pytest.raises(ModelNotFoundError, build_tokenizer, base, [broken]).value)
    # a full model without a tokenizer but with the base's vocabulary size uses the base's (as mergekit)
    same = tmp_path / "same"
    same.mkdir()
    (same / "config.json").write_text(json.dumps({"vocab_size": 8}))
    assert torch.equal(build_tokenizer(base, [same]).index_maps[1], build_tokenizer(base, []).index_maps[0])
    plan = build_tokenizer(base, [e1, e2])
    mats = rows_for(plan)
    with pytest.raises(MergeError, match="has 5 rows"):
        plan.align([mats[0], mats[1][:5], mats[2]])
    with pytest.raises(MergeError, match="rows have shape"):
        plan.align([mats[0], torch.zeros(mats[1].shape[0], 3), mats[2]])


# --------------------------------------------------------------------------------------------------------
# the pure function
# --------------------------------------------------------------------------------------------------------
def test_align_rows_on_tiny_tensors():
    base = torch.tensor([[1.0], [2.0], [3.0]])          # tokens t0 t1 t2
    e1 = torch.tensor([[10.0], [30.0], [40.0]])         # t0 t2 t3
    e2 = torch.tensor([[200.0], [400.0], [500.0]])      # t1 t3 t4
    maps = [torch.tensor([0, 1, 2, -1, -1, -1]), torch.tensor([0, -1, 1, 2, -1, -1]),
            torch.tensor([-1, 0, -1, 1, 2, -1])]
    out = align_rows([base, e1, e2], maps, 6, n_tokens=5)
    # t0: base+e1 -> e2 gets base's; t1: base+e2 -> e1 gets base's; t2 base+e1; t3: e1+e2 -> base gets mean;
    # t4: e2 only -> everyone gets e2's; row 5 is padding: each model's mean of its rows 0..4
    assert out[0][:5, 0].tolist() == [1, 2, 3, 220, 500]
    assert out[1][:5, 0].tolist() == [10, 2, 30, 40, 500]
    assert out[2][:5, 0].tolist() == [1, 200, 3, 400, 500]
    for o in out:
        assert torch.allclose(o[5], o[:5].mean(0))
    # no base given: t0 is in base and e1 -> their mean for e2
    out = align_rows([base, e1, e2], maps, 5, base=None)
    assert out[2][0, 0].item() == 5.5
    # overrides and force
    out = align_rows([base, e1, e2], maps, 5, overrides={0: TokenSource("model", model=1, force=True),
                                                       4: TokenSource("zero")})
    assert [o[0, 0].item() for o in out] == [10, 10, 10]
    assert [o[4, 0].item() for o in out] == [0, 0, 500]
    out = align_rows([base, e1, e2], maps, 5, overrides={3: TokenSource("model_row", model=0, row=2)})
    assert [o[3, 0].item() for o in out] == [3, 40, 400]
    # vocabulary along another axis, mixed dtypes promote
    out = align_rows([base.T.contiguous().bfloat16(), e1.T.contiguous(), e2.T.contiguous()], maps, 5, axis=1)
    assert out[0].shape == (1, 5) and out[0].dtype == torch.float32
    assert out[0][0].tolist() == [1, 2, 3, 220, 500]
