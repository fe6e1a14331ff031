"""LoRA extraction: ``ops.extract_low_rank``, the adapter writer for any experts, ``llm-merging extract-lora``."""
import errno
import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from llm_merging import ops
from llm_merging.cli import extract as extract_cli
from llm_merging.core.errors import ConfigError, OutputError
from llm_merging.model.extract import extract_lora
from llm_merging.model.save import EXTRACT_REPORT, AdapterWriter


def _low_rank_plus_noise(m, n, r, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    mat = torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)
    return mat + noise * torch.randn(m, n, generator=g)


def _energy_rank(mat, energy, cap):
    """The documented energy rule from a float64 NumPy SVD (independent of torch's)."""
    s = np.linalg.svd(mat.double().numpy(), compute_uv=False)
    total = float((mat.double().numpy() ** 2).sum())
    kept = np.cumsum(s ** 2)
    hits = np.nonzero(kept >= (energy - ops.svd.ENERGY_RTOL) * total)[0]
    return min(int(hits[0]) + 1 if hits.size else cap, cap)


# ---------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("method", ["full", "randomized", "auto"])
@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (64, 96)])
def test_extraction_is_exact_for_a_rank_r_matrix(method, shape):
    mat = _low_rank_plus_noise(*shape, 6, 0.0)
    b, a, err, r = ops.extract_low_rank(mat, rank=6, method=method)
    assert r == 6 and b.shape == (shape[0], 6) and a.shape == (6, shape[1])
    assert err < 1e-5
    assert torch.allclose(b @ a, mat, atol=1e-4 * float(mat.abs().max()))
    # energy 1 finds the exact rank, within a cap that leaves room
    b, a, err, r = ops.extract_low_rank(mat, energy=1.0, max_rank=20, method=method)
    assert r == 6 and err < 1e-5


@pytest.mark.parametrize("method", ["full", "randomized"])
def test_error_is_monotone_in_rank_and_matches_the_optimum(method):
    mat = _low_rank_plus_noise(256, 320, 24, 0.3, seed=1)
    s = np.linalg.svd(mat.double().numpy(), compute_uv=False)
    errs = []
    for r in (1, 2, 4, 8, 16, 24, 32, 64):
        b, a, err, got = ops.extract_low_rank(mat, rank=r, method=method)
        assert got == r
        measured = float(torch.linalg.matrix_norm(mat - b @ a) / torch.linalg.matrix_norm(mat))
        assert err == pytest.approx(measured, rel=1e-3, abs=1e-6)
        optimum = float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum()))  # Eckart–Young
        assert optimum - 1e-6 <= err <= optimum * 1.01 + 1e-6
        errs.append(err)
    assert all(x >= y for x, y in zip(errs, errs[1:]))


@pytest.mark.parametrize("method", ["full", "randomized", "auto"])
@pytest.mark.parametrize("energy", [0.1, 0.5, 0.9, 0.99, 1.0])
def test_energy_picks_the_documented_rank(method, energy):
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(300, 40, generator=g))
    v, _ = torch.linalg.qr(torch.randn(280, 40, generator=g))
    sig = 2.0 ** -torch.arange(40, dtype=torch.float32) * 10  # well separated singular values
    mat = (u * sig) @ v.T
    cap = 40 if method != "full" else 280
    b, a, err, r = ops.extract_low_rank(mat, energy=energy, max_rank=cap, method=method)
    assert r == _energy_rank(mat, energy, cap)
    assert b.shape[1] == r == a.shape[0]
    s = np.linalg.svd(mat.double().numpy(), compute_uv=False)
    assert 1 - err ** 2 >= energy - 1e-4  # the kept fraction is at least E
    assert err == pytest.approx(float(np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())), rel=1e-2, abs=1e-5)


def test_energy_on_noise_and_max_rank_cap():
    mat = _low_rank_plus_noise(300, 300, 10, 0.5, seed=3)
    for energy in (0.5, 0.8, 0.95):
        assert ops.extract_low_rank(mat, energy=energy, method="full")[3] == _energy_rank(mat, energy, 300)
    # the cap wins when E needs more; randomized and full agree on it
    need = _energy_rank(mat, 0.99, 300)
    assert need > 12
    assert ops.extract_low_rank(mat, energy=0.99, max_rank=12, method="randomized")[3] == 12
    assert ops.extract_low_rank(mat, energy=0.99, max_rank=12, method="full")[3] == 12
    # max_rank above the matrix size is capped at min(m, n)
    assert ops.extract_low_rank(mat[:, :8], energy=1.0, max_rank=100)[3] <= 8


def test_zero_matrix_and_bad_values():
    b, a, err, r = ops.extract_low_rank(torch.zeros(10, 20), energy=0.9)
    assert (err, r) == (0.0, 1) and b.shape == (10, 1) and a.shape == (1, 20) and not b.any()
    mat = torch.randn(8, 12)
    bad = [
        dict(), dict(rank=2, energy=0.5), dict(rank=0), dict(rank=-1), dict(rank=2.5), dict(rank=True),
        dict(rank=9), dict(energy=0.0), dict(energy=1.5), dict(energy=float("nan")), dict(energy="x"),
        dict(energy=0.5, max_rank=0), dict(rank=2, max_rank=4), dict(rank=2, method="lanczos"),
    ]
    for kw in bad:
        with pytest.raises(ConfigError) as info:
            ops.extract_low_rank(mat, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="exceeds min"):
        ops.extract_low_rank(mat, rank=9)
    with pytest.raises(ConfigError, match="matrix"):
        ops.extract_low_rank(torch.zeros(3, 4, 5), rank=1)


# ---------------------------------------------------------------------------------------- extraction

TRUE_RANK = 3


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=120, tie_word_embeddings=False, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=110, n_positions=64)).eval()


def _fine_tune(model, seed=1, rank=TRUE_RANK, embeddings=True, norms=True, biases=True, noise=0.0, vary=False):
    """A synthetic fine-tune of ``model``: a rank-``rank`` (plus noise) ΔW on every matrix of a dense layer
    (``vary``: ranks 1 … 2·rank from matrix to matrix), and changed embeddings, norms and biases."""
    g = torch.Generator().manual_seed(seed)
    ft = type(model)(model.config).eval()
    ft.load_state_dict(model.state_dict())
    emb = {id(ft.get_input_embeddings()), id(ft.get_output_embeddings())}
    with torch.no_grad():
        for mod in ft.modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.nn.Parameter):
                continue
            if id(mod) in emb:
                if embeddings:
                    w.add_(0.05 * torch.randn(w.shape, generator=g))
            elif w.dim() == 2:
                m, n = w.shape
                if vary:
                    rank = 1 + (rank * 7 + 3) % (2 * TRUE_RANK)
                w.add_(0.05 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank ** 0.5
                       + noise * torch.randn(m, n, generator=g))
                b = getattr(mod, "bias", None)
                if biases and isinstance(b, torch.nn.Parameter):
                    b.add_(0.1 * torch.randn(b.shape, generator=g))
            elif norms:
                w.add_(0.1 * torch.randn(w.shape, generator=g))
                b = getattr(mod, "bias", None)
                if isinstance(b, torch.nn.Parameter):
                    b.add_(0.1 * torch.randn(b.shape, generator=g))
    return ft


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-pairs")
    out = {}
    for kind, make in (("llama", _llama), ("gpt2", _gpt2)):
        base = make()
        base.save_pretrained(root / f"{kind}-base")
        _fine_tune(base).save_pretrained(root / f"{kind}-ft")
        _fine_tune(base, seed=5, noise=0.01, vary=True).save_pretrained(root / f"{kind}-ft-noisy")
        out[kind] = root / f"{kind}-base"
        out[kind + "-ft"] = root / f"{kind}-ft"
        out[kind + "-noisy"] = root / f"{kind}-ft-noisy"
    return out


def _peft_merged(base_dir, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def _params(path):
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return model, {n: p.detach() for n, p in model.named_parameters()}


def _factors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_reload_equals_base_plus_reconstructed_delta(pairs, tmp_path, kind):
    out = tmp_path / "adapter"
    report = extract_lora(str(pairs[kind]), str(pairs[kind + "-noisy"]), out, rank=2, svd="full", progress=False)
    saved = json.loads((out / EXTRACT_REPORT).read_text())
    assert saved["modules"] == report["modules"] and saved["totals"] == report["totals"]
    merged = {n: p.detach() for n, p in _peft_merged(pairs[kind], out).named_parameters()}
    _, base = _params(pairs[kind])
    _, ft = _params(pairs[kind + "-noisy"])
    tensors = _factors(out)
    assert report["modules"], "no LoRA module was written"
    for mod, entry in report["modules"].items():
        name = mod + ".weight"
        a = tensors[f"base_model.model.{mod}.lora_A.weight"]
        b = tensors[f"base_model.model.{mod}.lora_B.weight"]
        assert a.shape[0] == entry["rank"] == 2 and a.dtype == torch.float32
        rec = b @ a
        if kind == "gpt2":
            rec = rec.t()  # Conv1D stores (in, out)
        # PEFT's merged weight is exactly base + the saved factors' product
        torch.testing.assert_close(merged[name], base[name] + rec, rtol=0, atol=1e-6)
        delta = ft[name] - base[name]
        err = float(torch.linalg.matrix_norm(delta - rec) / torch.linalg.matrix_norm(delta))
        assert err == pytest.approx(entry["relative_error"], rel=1e-3, abs=1e-6)
        s = torch.linalg.svdvals(delta.double())
        assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)  # the best rank-2 approximation
    t = report["totals"]
    assert t["max_relative_error"] == max(e["relative_error"] for e in report["modules"].values())
    assert (out / "README.md").read_text().startswith("---\nbase_model:")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_exact_rank_and_modules_to_save_are_exact(pairs, tmp_path, kind):
    out = tmp_path / "adapter"
    report = extract_lora(str(pairs[kind]), str(pairs[kind + "-ft"]), out, rank=TRUE_RANK, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    merged_model = _peft_merged(pairs[kind], out)
    merged = {n: p.detach() for n, p in merged_model.named_parameters()}
    ft_model, ft = _params(pairs[kind + "-ft"])
    _, base = _params(pairs[kind])
    assert report["totals"]["max_relative_error"] < 1e-5
    changed = [n for n in ft if not torch.equal(ft[n], base[n])]
    for n in changed:
        mod = n.rpartition(".")[0]
        if mod in report["modules"]:
            torch.testing.assert_close(merged[n], ft[n], rtol=0, atol=2e-6)
        else:  # embeddings, norms and biases: bit for bit
            assert torch.equal(merged[n], ft[n]), n
    if kind == "gpt2":  # tied head: both modules saved whole; biases through PEFT's bias="all"
        assert {"transformer.wte", "lm_head"} <= set(config["modules_to_save"])
        assert config["bias"] == "all" and config["fan_in_fan_out"] is True
        assert torch.equal(merged_model.lm_head.weight, ft_model.lm_head.weight)
        assert any(k.endswith("c_attn.base_layer.bias") for k in _factors(out))
    else:
        assert {"model.embed_tokens", "lm_head", "model.norm", "model.layers.0.input_layernorm"} <= set(
            config["modules_to_save"])
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged_model(ids).logits, ft_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_energy_rule_per_module_and_rank_pattern_round_trip(pairs, tmp_path):
    from peft import PeftConfig

    out = tmp_path / "adapter"
    report = extract_lora(str(pairs["llama"]), str(pairs["llama-noisy"]), out, energy=0.9, max_rank=16,
                          progress=False)
    _, base = _params(pairs["llama"])
    _, ft = _params(pairs["llama-noisy"])
    ranks = set()
    for mod, entry in report["modules"].items():
        delta = ft[mod + ".weight"] - base[mod + ".weight"]
        assert entry["rank"] == _energy_rank(delta, 0.9, 16), mod
        ranks.add(entry["rank"])
    assert len(ranks) > 1, "the fixture should need different ranks"
    config = PeftConfig.from_pretrained(str(out))
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pairs["llama"])), str(out))
    for mod, entry in report["modules"].items():
        layer = model.base_model.model.get_submodule(mod)
        assert layer.r["default"] == entry["rank"] and layer.scaling["default"] == 1.0
    assert config.r == report["totals"]["rank"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_low_rank_embeddings(pairs, tmp_path, kind):
    """--embeddings low-rank: lora_embedding_A/B for the input embedding, lora_A/B for the head (kept whole
    when they are tied); PEFT's forward and merge equal the fine-tune with those two matrices replaced by
    base + the saved factors' product, and their errors are the optimal rank-r errors."""
    from peft import PeftModel

    out = tmp_path / "adapter"
    report = extract_lora(str(pairs[kind]), str(pairs[kind + "-ft"]), out, rank=TRUE_RANK, embeddings="low-rank",
                          svd="full", progress=False)
    if kind == "gpt2":  # tied: kept whole (merge_and_unload would add both modules' factors to the one weight)
        assert {"transformer.wte", "lm_head"} <= set(report["modules_to_save"])
        assert "transformer.wte" not in report["modules"] and "lm_head" not in report["modules"]
        merged, ft_model = _peft_merged(pairs[kind], out), _params(pairs[kind + "-ft"])[0]
        assert torch.equal(merged.lm_head.weight, ft_model.lm_head.weight)
        assert torch.equal(merged.transformer.wte.weight, ft_model.transformer.wte.weight)
        return
    emb = "model.embed_tokens"
    assert report["modules"][emb]["kind"] == "lora_embedding"
    assert report["modules"]["lm_head"]["kind"] == "lora"
    keys = _factors(out)
    recon_emb = (keys[f"base_model.model.{emb}.lora_embedding_B"] @ keys[f"base_model.model.{emb}.lora_embedding_A"]).t()
    recon_head = keys["base_model.model.lm_head.lora_B.weight"] @ keys["base_model.model.lm_head.lora_A.weight"]
    ref, ft = _params(pairs[kind + "-ft"])
    _, base = _params(pairs[kind])
    for name, recon in ((emb + ".weight", recon_emb), ("lm_head.weight", recon_head)):
        if name not in ft:  # tied head: the embedding's factors
            torch.testing.assert_close(recon, recon_emb, rtol=0, atol=1e-6)
            continue
        delta = ft[name] - base[name]
        s = torch.linalg.svdvals(delta.double())
        err = float(torch.linalg.matrix_norm(delta - recon) / torch.linalg.matrix_norm(delta))
        assert err == pytest.approx(report["modules"][name.rpartition(".")[0]]["relative_error"], rel=1e-3)
        assert err == pytest.approx(float(s[TRUE_RANK:].norm() / s.norm()), rel=1e-4)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(base[emb + ".weight"] + recon_emb)
        if "lm_head.weight" in ft:
            ref.lm_head.weight.copy_(base["lm_head.weight"] + recon_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(pairs[kind])), str(out)).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.merge_and_unload()(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_writer_rank_rules_and_errors():
    model = _llama()
    with pytest.raises(ConfigError, match="full fine-tune"):
        AdapterWriter().bind(model, [type("E", (), {"kind": "full", "name": "ft"})()])
    for kw in (dict(rank=0), dict(rank=2, energy=0.5), dict(energy=0.0), dict(energy=1.2), dict(rank=2, max_rank=3),
               dict(embeddings="dense"), dict(svd="qr"), dict(max_rank=-1)):
        with pytest.raises(ConfigError):
            AdapterWriter(**kw)
    w = AdapterWriter(rank=4).bind(model, [])
    with pytest.raises(ConfigError, match="3-D tensor"):
        w("model.layers.0.mlp.experts.gate_up_proj", torch.ones(2, 3, 4))
    w("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 64))  # unchanged: nothing
    with pytest.raises(ConfigError, match="no parameter differs"):
        w.save("/nonexistent/never", "base")
    w("model.norm.weight", torch.ones(64))
    with pytest.raises(ConfigError, match="at least one LoRA layer"):
        w.save("/nonexistent/never", "base")


class _Headed(torch.nn.Module):
    """A body Linear, a norm, and an output head with a bias (as Phi's); ``vision.norm`` ends with ``norm``."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.vision = torch.nn.Module()
        self.vision.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 6)

    def get_output_embeddings(self):
        return self.head


def test_writer_keeps_a_head_with_its_bias_and_avoids_name_clashes(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _Headed()
    new = {n: p.detach() + 0.1 * torch.randn(p.shape) for n, p in model.named_parameters()
           if n in ("body.weight", "head.weight", "head.bias", "norm.weight")}
    w = AdapterWriter(rank=2).bind(model, [])
    for n, v in new.items():
        w(n, v - dict(model.named_parameters())[n].detach(), value=v)
    out = w.save(tmp_path / "a", "base")
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    # 'norm' would also match 'vision.norm' in PEFT's suffix match: left out, its tensors load directly
    assert config["modules_to_save"] == ["head"] and config["bias"] == "none"
    assert torch.equal(tensors["base_model.model.head.bias"], new["head.bias"])
    assert torch.equal(tensors["base_model.model.head.weight"], new["head.weight"])
    assert torch.equal(tensors["base_model.model.norm.weight"], new["norm.weight"])
    assert torch.equal(tensors["base_model.model.norm.bias"], model.norm.bias.detach())  # unchanged, still saved
    assert w.report()["modules"]["body"]["rank"] == 2
    from peft import PeftModel

    config.pop("task_type")  # a plain nn.Module: PEFT's base PeftModel
    (out / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = dict(PeftModel.from_pretrained(_Headed(), str(out)).merge_and_unload().named_parameters())
    for n in ("head.weight", "head.bias", "norm.weight"):
        assert torch.equal(merged[n], new[n]), n
    assert torch.equal(merged["vision.norm.weight"], model.vision.norm.weight)


def test_save_adapter_of_a_full_fine_tune_merge(tmp_path):
    """The engine's --save adapter path with full fine-tunes: PEFT reload within the reported error."""
    from llm_merging.merging.TaskArithmetic import TaskArithmetic
    from llm_merging.model import tiny

    m = TaskArithmetic()
    m.base_model_name = str(tiny.base_dir("decoder"))
    m.list_models = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    m.device, m.progress = "cpu", False
    m.set_hyperparameters({"weights": [0.5, 0.5]} if "weights" in m.hyperparameters else {})
    m.delta_sink = AdapterWriter(energy=1.0)
    m.merge()
    path = m.delta_sink.save(tmp_path / "adapter", str(tiny.base_dir("decoder")))
    report = json.loads((path / EXTRACT_REPORT).read_text())
    merged = {n: p.detach() for n, p in m.base_model.named_parameters()}
    got = {n: p.detach() for n, p in _peft_merged(tiny.base_dir("decoder"), path).named_parameters()}
    _, base = _params(tiny.base_dir("decoder"))
    assert report["modules"] and report["totals"]["max_relative_error"] < 1e-2  # energy 1 − 1e-5
    for n, p in merged.items():
        mod = n.rpartition(".")[0]
        if mod in report["modules"]:  # within the reported error
            err = float(torch.linalg.matrix_norm(got[n] - p) / torch.linalg.matrix_norm(p - base[n]))
            assert err <= report["modules"][mod]["relative_error"] * 1.01 + 1e-5, n
        else:
            torch.testing.assert_close(got[n], p, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the CLI
def _cli(argv, capsys):
    code = extract_cli.main([str(a) for a in argv] + ["-q"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_writes_the_adapter(pairs, tmp_path, capsys):
    out = tmp_path / "cli-adapter"
    code = extract_cli.main(["--base-model", str(pairs["llama"]), "--model", str(pairs["llama-ft"]), "--out", str(out),
                             "--energy", "1.0", "--max-rank", "8", "-q"])
    text = capsys.readouterr().out
    assert code == 0 and "relative error" in text
    report = json.loads((out / EXTRACT_REPORT).read_text())
    assert {e["rank"] for e in report["modules"].values()} == {TRUE_RANK}
    # bfloat16 factors: the reported error is that of the factors as saved
    out16 = tmp_path / "cli-bf16"
    assert extract_cli.main(["--base-model", str(pairs["llama"]), "--model", str(pairs["llama-ft"]), "--out",
                             str(out16), "--rank", str(TRUE_RANK), "--dtype", "bfloat16", "-q"]) == 0
    report16 = json.loads((out16 / EXTRACT_REPORT).read_text())
    tensors = _factors(out16)
    _, base = _params(pairs["llama"])
    _, ft = _params(pairs["llama-ft"])
    for mod, entry in report16["modules"].items():
        a, b = tensors[f"base_model.model.{mod}.lora_A.weight"], tensors[f"base_model.model.{mod}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.bfloat16
        delta = ft[mod + ".weight"] - base[mod + ".weight"]
        err = float(torch.linalg.matrix_norm(delta - b.float() @ a.float()) / torch.linalg.matrix_norm(delta))
        assert err == pytest.approx(entry["relative_error"], rel=1e-3) and 1e-4 < err < 1e-2


def test_cli_errors_are_one_line_and_leave_nothing(pairs, tmp_path, capsys, monkeypatch):
    base, ft = pairs["llama"], pairs["llama-ft"]
    root = tmp_path / "bad"
    # a fine-tune with another shape (a wider MLP) and one with another vocabulary
    other = _llama(intermediate_size=80)
    other.save_pretrained(root / "wider")
    _llama(vocab_size=130).save_pretrained(root / "vocab")
    _gpt2().save_pretrained(root / "gpt2")
    adapter = root / "adapter"
    extract_lora(str(base), str(ft), adapter, rank=1, progress=False)
    (root / "nonempty").mkdir()
    (root / "nonempty" / "x.txt").write_text("x")
    (root / "afile").write_text("x")
    cases = [
        (["--model", root / "wider", "--rank", "2"], "shape"),
        (["--model", root / "vocab", "--rank", "2"], "rows"),
        (["--model", root / "gpt2", "--rank", "2"], "not a fine-tune"),
        (["--model", ft, "--rank", "0"], "--rank 0: expected a positive integer"),
        (["--model", ft, "--rank", "-3"], "--rank -3: expected a positive integer"),
        (["--model", ft, "--rank", "97"], "exceeds the size of every matrix"),
        (["--model", ft, "--energy", "0"], "--energy 0.0: outside (0, 1]"),
        (["--model", ft, "--energy", "1.5"], "--energy 1.5: outside (0, 1]"),
        (["--model", ft, "--energy", "nan"], "--energy nan: outside (0, 1]"),
        (["--model", ft, "--energy", "inf"], "--energy inf: outside (0, 1]"),
        (["--model", ft, "--rank", "2", "--max-rank", "4"], "--max-rank applies with --energy, not with --rank"),
        (["--model", ft, "--energy", "0.5", "--max-rank", "0"], "--max-rank 0: expected a positive integer"),
        (["--model", ft, "--energy", "0.5", "--max-rank", "-2"], "--max-rank -2: expected a positive integer"),
        (["--model", adapter, "--rank", "2"], "PEFT adapter"),
        (["--model", root / "missing", "--rank", "2"], "--model: model directory"),
        (["--model", root / "missing", "--rank", "2"], "does not exist"),
        (["--model", ft, "--rank", "2", "--out", base], "overlaps the input"),
        (["--model", ft, "--rank", "2", "--out", base.parent], "overlaps the input"),  # holds both
    ]
    for argv, words in cases:
        out = tmp_path / "out"
        code, err = _cli(["--base-model", base, "--out", out, *argv], capsys)
        assert code == 2 and "\n" not in err and words in err, (argv, err)
        assert not out.exists(), argv
    for out, words in ((root / "nonempty", "not empty"), (root / "afile", "existing file")):
        code, err = _cli(["--base-model", base, "--model", ft, "--out", out, "--rank", "2"], capsys)
        assert code == 2 and words in err and "\n" not in err and err.startswith("error: --out")
    assert sorted(p.name for p in (root / "nonempty").iterdir()) == ["x.txt"]
    # a bad option is the only line, even without -q (no hint logged before it)
    code = extract_cli.main([str(a) for a in ("--base-model", base, "--model", ft, "--out", tmp_path / "o2",
                                              "--energy", "1.5")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--energy 1.5" in err, err
    for kw, words in ((dict(rank=2.5), "--rank 2.5"), (dict(rank=True), "--rank True"), (dict(energy="x"), "--energy"),
                      (dict(rank=2, energy=0.5), "give exactly one"),
                      (dict(energy=0.5, max_rank=1.5), "--max-rank 1.5")):
        with pytest.raises(ConfigError, match="^" + words.replace(".", r"\.")):
            extract_lora(str(base), str(ft), tmp_path / "o3", progress=False, **kw)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    # a hub id that is not cached: the hint names the flag that gave it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err = _cli(["--base-model", "nobody/no-such-base", "--model", ft, "--out", tmp_path / "o4", "--rank", "2"],
                     capsys)
    assert code == 2 and "\n" not in err and err.startswith("error: --base-model: model 'nobody/no-such-base'"), err
    assert "local directory as --base-model" in err and "--models" not in err
    # a full disk while writing: one line, nothing half-written
    from llm_merging.model import save as save_module

    def full(path, tensors):
        with open(path, "wb") as fh:
            fh.write(b"x" * 1000)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_module, "write_safetensors", full)
    out = tmp_path / "full-disk"
    code, err = _cli(["--base-model", base, "--model", ft, "--out", out, "--rank", "2"], capsys)
    assert code == 2 and "no space left" in err and "\n" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".full-disk")]
    assert OutputError.exit_code == 2
