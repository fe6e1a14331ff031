"""``llm-merging tokensurgeon``: a tiny model given another tokenizer. Shared tokens keep their rows bit for bit,
new tokens' rows follow each method's rule (checked against computations written here from the definitions),
the output loads, generates and merges, mergekit-tokensurgeon gives the same tensors, and bad input is one line."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mergekit_tool
from safetensors.torch import load_file

from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.model import tiny
from llm_merging.model.tokensurgeon import (
    Options,
    build_matrix,
    byte_match,
    match_vocabularies,
    normalized_vocabulary,
    plan_transplant,
    prefix_match,
    transplant,
)

MERGEKIT = mergekit_tool("mergekit-tokensurgeon")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


# ----------------------------------------------------------------------------------------------- fixtures


def _save_llama(out: Path, tok, hidden: int, tied: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=None, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(str(out))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """MODEL: the tiny base (``▁`` BPE, 1024 tokens, untied). DONORS: a ``▁`` BPE trained on other text (some
    tokens shared, some new, another order; hidden 48, tied) and a GPT-2-style byte-level BPE (untied)."""
    root = tmp_path_factory.mktemp("tokensurgeon")
    lines = tiny._corpus()[::-1] + ["zebra quantum xylophone tokensurgeon transplant embeddings"] * 20
    donor = root / "donor"
    tok = tiny.train_bpe_tokenizer(donor, lines, 700, byte_level=False)
    _save_llama(donor, tok, hidden=48, tied=True, seed=1)
    gpt = root / "donor-gpt2"
    tok = tiny.train_bpe_tokenizer(gpt, lines, 600, byte_level=True)
    _save_llama(gpt, tok, hidden=56, tied=False, seed=2)
    return {"model": tiny.base_dir("decoder"), "donor": donor, "gpt2": gpt, "root": root}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _run(pair, donor_key: str, tag: str, **opts) -> tuple[Path, dict]:
    out = pair["root"] / f"out-{tag}"
    if not out.exists():
        transplant(str(pair["model"]), str(pair[donor_key]), str(out), Options(**opts), progress=False)
    return out, _tensors(out)


def _vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)).get_vocab()


def _shared(model_vocab: dict[str, int], donor_vocab: dict[str, int], donor_marker="▁",
            specials=None) -> dict[int, int]:
    """donor id -> model id of every token both have, written from the rule: the same text once the
    word-start marker is made one (the model's is ``▁``); ``specials``: donor token -> model token of the
    same special role."""
    def key(t, marker):
        return (t[len(marker):], 1) if t.startswith(marker) else (t, 0)

    keyed = {key(t, "▁"): i for t, i in model_vocab.items()}
    out = {}
    for t, i in donor_vocab.items():
        if specials and t in specials:
            out[i] = model_vocab[specials[t]]
        elif key(t, donor_marker) in keyed:
            out[i] = keyed[key(t, donor_marker)]
    return out


def _omp_reference(target: np.ndarray, atoms: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Textbook OMP, one target: pick the atom most correlated with the residual, refit by least squares."""
    picked: list[int] = []
    residual = target.copy()
    coef = np.zeros(0)
    for _ in range(k):
        score = np.abs(atoms @ residual)
        score[picked] = -np.inf
        picked.append(int(np.argmax(score)))
        sub = atoms[picked].T
        coef = np.linalg.lstsq(sub, target, rcond=None)[0]
        residual = target - sub @ coef
    return picked, coef


# ------------------------------------------------------------------------------------ rows: the rules
def test_shared_tokens_keep_their_rows_exactly(pair):
    _, got = _run(pair, "donor", "omp", k=8)
    model = _tensors(pair["model"])
    shared = _shared(_vocab(pair["model"]), _vocab(pair["donor"]))
    assert 300 < len(shared) < len(_vocab(pair["donor"]))  # some shared, some new
    assert any(d != m for d, m in shared.items())  # another order
    for name in (EMBED, HEAD):
        assert got[name].shape == (len(_vocab(pair["donor"])), model[name].shape[1])
        d, m = torch.tensor(list(shared)), torch.tensor(list(shared.values()))
        assert torch.equal(got[name][d], model[name][m])
    for name, t in model.items():  # every other tensor as it was
        if name not in (EMBED, HEAD):
            assert torch.equal(got[name], t), name


def test_new_rows_follow_orthogonal_matching_pursuit(pair):
    k = 8
    _, got = _run(pair, "donor", "omp", k=k)
    model, donor = _tensors(pair["model"]), _tensors(pair["donor"])
    mv, dv = _vocab(pair["model"]), _vocab(pair["donor"])
    shared = _shared(mv, dv)
    new = sorted(set(dv.values()) - set(shared))
    assert len(new) > 20
    d_ids = sorted(shared)  # shared tokens in donor order
    m_ids = [shared[i] for i in d_ids]
    # the donor is tied: its input embeddings stand for its LM head too
    atoms = donor[EMBED][d_ids].double().numpy()
    for name in (EMBED, HEAD):
        basis = model[name][m_ids].double().numpy()
        for j in new:
            picked, coef = _omp_reference(donor[EMBED][j].double().numpy(), atoms, k)
            want = torch.from_numpy(coef @ basis[picked])
            assert torch.allclose(got[name][j].double(), want, rtol=1e-4, atol=1e-5 * float(want.norm())), (name, j)


def test_common_interpolation_rules(pair):
    k = 6
    model, donor = _tensors(pair["model"]), _tensors(pair["donor"])
    shared = _shared(_vocab(pair["model"]), _vocab(pair["donor"]))
    new = sorted(set(_vocab(pair["donor"]).values()) - set(shared))
    d_ids = sorted(shared)
    atoms = donor[EMBED][d_ids].double().numpy()
    basis = model[EMBED][[shared[i] for i in d_ids]].double().numpy()
    for scheme, cosine in (("distance_proportional", False), ("distance_proportional", True), ("barycentric", False),
                           ("least_squares", False)):
        _, got = _run(pair, "donor", f"ci-{scheme}-{cosine}", method="common_interpolation", k=k,
                      weight_scheme=scheme, cosine_similarity=cosine)
        for j in new[:25]:
            x = donor[EMBED][j].double().numpy()
            if cosine:
                dist = 1 - atoms @ x / (np.linalg.norm(atoms, axis=1) * np.linalg.norm(x))
            else:
                dist = np.linalg.norm(atoms - x, axis=1)
            near = np.argsort(dist, kind="stable")[:k]
            p = atoms[near]
            if scheme == "distance_proportional":
                w = (1 - dist[near]) if cosine else 1 / dist[near]
                w = w / w.sum()
            elif scheme == "least_squares":
                w = np.linalg.lstsq(p.T, x, rcond=None)[0]
            else:  # minimise |p.T w - x| under sum(w) = 1: w = w0 + N z with N a basis of sum-zero vectors
                w0 = np.full(k, 1 / k)
                null = np.linalg.svd(np.ones((1, k)))[2][1:].T
                z = np.linalg.lstsq(p.T @ null, x - p.T @ w0, rcond=None)[0]
                w = w0 + null @ z
            want = torch.from_numpy(w @ basis[near])
            assert torch.allclose(got[EMBED][j].double(), want, rtol=1e-4, atol=1e-4 * float(want.norm())), \
                (scheme, cosine, j)


@pytest.mark.parametrize("sub", ["mean", "sum", "weighted_mean", "first_last"])
def test_subword_rows_combine_the_pieces(pair, sub):
    from transformers import AutoTokenizer

    _, got = _run(pair, "donor", f"subword-{sub}", method="subword", subword_method=sub)
    model = _tensors(pair["model"])
    mtok = AutoTokenizer.from_pretrained(str(pair["model"]))
    dv = _vocab(pair["donor"])
    shared = _shared(_vocab(pair["model"]), dv)
    inv = {i: t for t, i in dv.items()}
    for j in sorted(set(dv.values()) - set(shared))[:30]:
        text = inv[j].replace("▁", " ", 1) if inv[j].startswith("▁") else inv[j]
        ids = mtok(text, add_special_tokens=False)["input_ids"]
        for name in (EMBED, HEAD):
            rows = model[name][ids].double()
            if sub == "mean":
                want = rows.mean(0)
            elif sub == "sum":
                want = rows.sum(0)
            elif sub == "weighted_mean":  # heavier towards the last piece (input) / the first piece (LM head)
                w = torch.arange(1, len(ids) + 1, dtype=torch.float64)
                w = w.flip(0) if name == HEAD else w
                want = (w[:, None] * rows).sum(0) / w.sum()
            else:
                want = rows[0] if name == HEAD else rows[-1]
            assert torch.allclose(got[name][j].double(), want, atol=1e-6), (sub, name, j, inv[j])


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_mean_and_zero(pair, method):
    _, got = _run(pair, "donor", method, method=method)
    model = _tensors(pair["model"])
    new = sorted(set(_vocab(pair["donor"]).values()) - set(_shared(_vocab(pair["model"]), _vocab(pair["donor"]))))
    for name in (EMBED, HEAD):
        want = model[name].mean(0) if method == "mean" else torch.zeros(model[name].shape[1])
        assert torch.allclose(got[name][new], want.expand(len(new), -1), atol=1e-6)


def test_word_start_markers_and_special_roles_match_across_styles(pair):
    """A GPT-2-style donor (``Ġthe``) shares ``▁the`` with the SentencePiece-style model; its
    ``<|endoftext|>`` (bos, eos, unk) takes the model's row of the same role."""
    from transformers import AutoTokenizer

    dtok = AutoTokenizer.from_pretrained(str(pair["gpt2"]))
    mv, dv = _vocab(pair["model"]), dtok.get_vocab()
    norm_m, norm_d = normalized_vocabulary(AutoTokenizer.from_pretrained(str(pair["model"]))), normalized_vocabulary(dtok)
    assert norm_d[("word_start", "the")] == dv["Ġthe"] and norm_m[("word_start", "the")] == mv["▁the"]
    _, got = _run(pair, "gpt2", "gpt2", k=8)
    model = _tensors(pair["model"])
    assert torch.equal(got[EMBED][dv["Ġthe"]], model[EMBED][mv["▁the"]])
    role = next(r for r, t in dtok.special_tokens_map.items() if t == "<|endoftext|>")
    model_special = AutoTokenizer.from_pretrained(str(pair["model"])).special_tokens_map[role]
    assert torch.equal(got[HEAD][dv["<|endoftext|>"]], model[HEAD][mv[model_special]])
    shared = _shared(mv, dv, donor_marker="Ġ", specials={"<|endoftext|>": model_special})
    d, m = torch.tensor(list(shared)), torch.tensor(list(shared.values()))
    assert torch.equal(got[HEAD][d], model[HEAD][m])


def test_byte_and_prefix_matches():
    vocab = {"<0x41>": 5, ("word_start", "hel"): 7, "ab": 9, "x": 11, ("special", "bos_token"): 1}
    assert byte_match("A", vocab) == 5 and byte_match("<0x78>", vocab) == 11 and byte_match("B", vocab) is None
    assert prefix_match(("word_start", "hello"), vocab) == 7 and prefix_match("abc", vocab) == 9
    assert prefix_match(("special", "bos_token"), vocab) is None and prefix_match("hello", vocab) is None
    m = match_vocabularies({"a": 0, "<0x41>": 1, "ab": 2}, {"A": 0, "abz": 1, "a": 2, "q": 3}, 3,
                           allow_byte=True, allow_prefix=True)
    assert m.index_map.tolist() == [1, 2, 0, -1] and m.counts["approximated"] == 1 and m.new_ids.tolist() == [3]
    assert m.shared_model.tolist() == [0] and m.shared_donor.tolist() == [2]  # only exact matches are the basis


def test_batches_and_scale_do_not_change_the_rule(pair):
    """Approximating 7 tokens at a time equals all at once; --new-vocab-scale scales only the new rows."""
    from transformers import AutoTokenizer

    mt, dt = (AutoTokenizer.from_pretrained(str(pair[k])) for k in ("model", "donor"))
    model, donor = _tensors(pair["model"])[EMBED], _tensors(pair["donor"])[EMBED]
    match = match_vocabularies(normalized_vocabulary(mt), normalized_vocabulary(dt), model.shape[0], donor.shape[0])
    whole = build_matrix(model, donor, match, Options(k=5, batch_size=-1))
    assert torch.allclose(build_matrix(model, donor, match, Options(k=5, batch_size=7)), whole, atol=1e-6)
    scaled = build_matrix(model, donor, match, Options(k=5, new_vocab_scale=0.5))
    assert torch.allclose(scaled[match.new_ids], 0.5 * whole[match.new_ids], atol=1e-6)
    assert torch.equal(scaled[match.shared_donor], whole[match.shared_donor])


# ----------------------------------------------------------------------------- the output as a model
def test_output_config_loads_and_generates(pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = _run(pair, "gpt2", "gpt2", k=8)
    cfg = json.loads((out / "config.json").read_text())
    dtok = AutoTokenizer.from_pretrained(str(pair["gpt2"]))
    assert cfg["vocab_size"] == len(dtok) and cfg["hidden_size"] == 64
    assert cfg["eos_token_id"] == dtok.eos_token_id == cfg["bos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == dtok.get_vocab()
    ids = tok("The quick brown fox", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_tied_model_keeps_one_matrix(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "tied"
    tok = AutoTokenizer.from_pretrained(str(pair["model"]))
    tok.save_pretrained(str(src))
    _save_llama(src, tok, hidden=32, tied=True, seed=3)
    out = tmp_path / "tied-out"
    report = transplant(str(src), str(pair["donor"]), str(out), Options(k=4), progress=False)
    assert list(report["matrices"]) == [EMBED]
    got = _tensors(out)
    assert HEAD not in got
    shared = _shared(tok.get_vocab(), _vocab(pair["donor"]))
    assert torch.equal(got[EMBED][list(shared)], _tensors(src)[EMBED][list(shared.values())])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_output_merges_with_a_fine_tune_of_the_donor_tokenizer(pair, tmp_path, capsys):
    """Two fine-tunes with different tokenizers: each re-tokenized (or trained) with the donor's, then a
    task_arithmetic merge through the CLI equals base + w·Σ(expert − base) on every tensor."""
    base, a, b = tmp_path / "base", tmp_path / "a", tmp_path / "b"
    for src, dst in ((pair["model"], base), (tiny.full_expert_dir("decoder", 0), a),
                     (tiny.full_expert_dir("decoder", 1), b)):
        assert main(["tokensurgeon", str(src), str(pair["donor"]), str(dst), "-k", "8", "-q"]) == 0
    code = main(["-m", "task_arithmetic", "--base-model", str(base), "--models", str(a), str(b), "--output_folder",
                 str(tmp_path / "merge"), "--no-eval", "--quiet", "--set", "weights=0.5"])
    assert code == 0, capsys.readouterr().err
    merged = _tensors(tmp_path / "merge" / "task_arithmetic" / "merged_model")
    tb, ta, tbb = _tensors(base), _tensors(a), _tensors(b)
    assert merged[EMBED].shape[0] == len(_vocab(pair["donor"]))
    for name, t in tb.items():
        want = t + 0.5 * (ta[name] - t) + 0.5 * (tbb[name] - t)
        assert torch.allclose(merged[name], want, rtol=1e-5, atol=1e-6), name


# ----------------------------------------------------------------------------------- mergekit parity
@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-tokensurgeon not found ($MERGEKIT_VENV or PATH)")
@pytest.mark.parametrize("donor_key, args", [
    ("donor", ["-k", "8"]),
    ("gpt2", ["-k", "8"]),
    ("donor", ["-a", "common_interpolation", "-k", "8"]),
    ("donor", ["-a", "common_interpolation", "-k", "8", "-c"]),
    ("donor", ["-a", "common_interpolation", "-k", "8", "-w", "barycentric"]),
    ("donor", ["-a", "subword"]),
    ("donor", ["-a", "subword", "-s", "first_last"]),
    ("donor", ["-a", "mean"]),
    ("donor", ["-k", "8", "-pm", "yes", "-bm", "yes"]),
])
def test_equals_mergekit_tokensurgeon(pair, tmp_path, donor_key, args):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    assert main(["tokensurgeon", str(pair["model"]), str(pair[donor_key]), str(ours), "-q", *args]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([MERGEKIT, str(pair["model"]), str(pair[donor_key]), str(theirs), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    for name in a:
        rel = float((a[name].double() - b[name].double()).norm() / b[name].double().norm().clamp_min(1e-12))
        assert rel <= 1e-4, (name, rel)
    ca, cb = json.loads((ours / "config.json").read_text()), json.loads((theirs / "config.json").read_text())
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert ca.get(key) == cb.get(key), key


# ---------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv, *words):
    try:
        code = main(["tokensurgeon", *argv])
    except SystemExit as exc:  # a flag error from the parser
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def test_errors_are_one_line_and_write_nothing(pair, tmp_path, capsys):
    model, donor = str(pair["model"]), str(pair["donor"])
    out = tmp_path / "out"
    _one_line_error(capsys, [str(tmp_path / "nope"), donor, str(out)], "MODEL: ", "nope")
    _one_line_error(capsys, [model, str(tmp_path / "nope2"), str(out)], "DONOR: ", "nope2")
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(donor) / f, no_tok / f)
    _one_line_error(capsys, [model, str(no_tok), str(out)], "no tokenizer", "DONOR")
    _one_line_error(capsys, [str(no_tok), donor, str(out)], "no tokenizer", "MODEL")
    tok_only = tmp_path / "tok-only"
    shutil.copytree(donor, tok_only, ignore=shutil.ignore_patterns("*.safetensors"))
    _one_line_error(capsys, [model, str(tok_only), str(out)], "no model weights")  # omp reads the donor's
    assert main(["tokensurgeon", model, str(tok_only), str(tmp_path / "sub"), "-a", "subword", "-q"]) == 0
    no_embed = tmp_path / "no-embed"
    shutil.copytree(model, no_embed)
    from safetensors.torch import save_file
    state = _tensors(no_embed)
    state.pop(EMBED)
    save_file(state, str(no_embed / "model.safetensors"), metadata={"format": "pt"})
    _one_line_error(capsys, [str(no_embed), donor, str(out)], "no input embeddings", "embed_tokens")
    _one_line_error(capsys, [model, donor, str(out), "-a", "magic"], "invalid choice", "magic")
    _one_line_error(capsys, [model, donor, str(out), "-k", "0"], "-k", "positive")
    _one_line_error(capsys, [model, donor, str(out), "-k", "-3"], "-k")
    _one_line_error(capsys, [model, donor, str(out), "-k", "100000"], "share")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    _one_line_error(capsys, [model, donor, str(full)], "OUT '", "not empty")
    _one_line_error(capsys, [model, donor, donor], "OUT '", "overlaps the input")
    _one_line_error(capsys, [model, donor, str(Path(donor).parent)], "OUT '", "overlaps the input")  # holds DONOR
    for bad in ("nan", "inf", "-inf", "0", "-0.5"):
        _one_line_error(capsys, [model, donor, str(out), f"--new-vocab-scale={bad}"], "--new-vocab-scale",
                        "finite positive")
    _one_line_error(capsys, [model, donor, str(out), "--device", "tpu"], "--device")
    if not torch.cuda.is_available():
        _one_line_error(capsys, [model, donor, str(out), "--device", "cuda"], "--device cuda", "no GPU")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers
    with pytest.raises(Exception, match="unknown approximation method"):
        plan_transplant(model, donor, str(out), Options(method="magic"))
    for scale in (float("nan"), float("inf"), 0, 0.0, -1.0, True, "2"):
        with pytest.raises(ConfigError, match="--new-vocab-scale"):
            plan_transplant(model, donor, str(out), Options(new_vocab_scale=scale))
    assert not out.exists()


def _fake_hub_cache(root: Path, repo_id: str, revision: str, src: Path) -> None:
    """``src`` as revision ``revision`` of hub repo ``repo_id`` in a Hugging Face cache at ``root`` (the
    layout huggingface_hub reads offline: refs/REVISION holds the commit, snapshots/COMMIT the files)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)


def test_hub_ids_revisions_and_devices(pair, tmp_path, capsys, monkeypatch):
    """MODEL and DONOR are model references like every command's (``id@revision`` from the Hugging Face cache;
    a hub id that is not cached: one line naming the argument); ``--device auto`` is the GPU when there is one."""
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "org/donor", "v1", pair["donor"])
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read when huggingface_hub is imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["tokensurgeon", str(pair["model"]), "org/donor@v1", str(out), "-a", "mean", "--device", "auto",
                 "-q"]) == 0
    assert _vocab(out) == _vocab(pair["donor"])
    err = _one_line_error(capsys, [str(pair["model"]), "org/donor@v2", str(tmp_path / "o2")], "DONOR: ",
                          "org/donor", "(revision v2)", "not in the Hugging Face cache", "local directory as DONOR")
    assert "--base-model" not in err and "--models" not in err
    _one_line_error(capsys, ["org/missing", str(pair["donor"]), str(tmp_path / "o2")], "MODEL: ", "org/missing",
                    "local directory as MODEL")
    assert not (tmp_path / "o2").exists()
    assert Options(device="auto").torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Options(device="auto").torch_device() == torch.device("cuda")
    assert Options(device="cpu").torch_device() == torch.device("cpu")
