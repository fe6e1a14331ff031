"""RegMean / RegMean++ and the calibration infrastructure, against independent computations: least squares
in closed form, per-dimension weighting at alpha=0, Gram matrices from separately loaded experts (PEFT's
merge_and_unload, full checkpoints) run prompt by prompt without padding; calibration files and errors."""
import json

import pytest
import torch

from llm_merging.merging import calibration as cal
from llm_merging import ops
from llm_merging.model import tiny
from conftest import merged_method as _merged, write_lines as _write
from llm_merging.core.errors import ConfigError, DataError
from llm_merging.main import main
from llm_merging.merging.factory import instantiate
from llm_merging.pipeline import CalibrationConfig, RunConfig, Runner

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "A summary is", "Question: which one?",
           "According to the above context, choose the best option to answer the following question.",
           "Options: A. B. C. D.", "None of the above choices."]


def _lstsq_merge(xs, ws):
    """argmin_W Σ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖² by least squares on the stacked system (float64)."""
    a = torch.cat([x.double() for x in xs])
    b = torch.cat([x.double() @ w.double().T for x, w in zip(xs, ws)])
    return torch.linalg.lstsq(a, b).solution.T


# ------------------------------------------------------------------ the op
def test_regmean_alpha_one_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 7, generator=g)
    ws = [w0 + torch.randn(5, 7, generator=g) for _ in range(3)]
    xs = [torch.randn(n, 7, generator=g) * torch.linspace(0.2, 3, 7) for n in (20, 31, 12)]
    tau = ops.regmean([w - w0 for w in ws], [x.T @ x for x in xs], alpha=1.0, ridge=0.0)
    assert torch.allclose(w0.double() + tau.double(), _lstsq_merge(xs, ws), atol=2e-5)
    default = ops.regmean([w - w0 for w in ws], [x.T @ x for x in xs], alpha=1.0)  # the tiny ridge: close
    assert torch.allclose(default, tau, atol=1e-3)
    # Conv1D layout (W stored (in, out)) gives the same weights, transposed
    tau_t = ops.regmean([(w - w0).T for w in ws], [x.T @ x for x in xs], alpha=1.0, transposed=True, ridge=0.0)
    assert torch.allclose(tau_t.T, tau, atol=1e-5)
    # weights: the weighted least squares Σ wᵢ‖·‖², i.e. rows of Xᵢ scaled by √wᵢ
    wts = [0.2, 1.0, 3.0]
    tau_w = ops.regmean([w - w0 for w in ws], [x.T @ x for x in xs], alpha=1.0, weights=wts, ridge=0.0)
    ref = _lstsq_merge([x * wt ** 0.5 for x, wt in zip(xs, wts)], ws)
    assert torch.allclose(w0.double() + tau_w.double(), ref, atol=2e-5)


def test_regmean_alpha_zero_is_the_per_dimension_weighted_average():
    g = torch.Generator().manual_seed(1)
    taus = [torch.randn(4, 6, generator=g) for _ in range(2)]
    xs = [torch.randn(15, 6, generator=g) * torch.rand(6, generator=g) for _ in range(2)]
    grams = [x.T @ x for x in xs]
    got = ops.regmean(taus, grams, alpha=0.0, ridge=0.0)
    d = [gr.diagonal() for gr in grams]  # Σ_tokens x_d² per input dimension d
    ref = (taus[0] * d[0] + taus[1] * d[1]) / (d[0] + d[1])
    assert torch.allclose(got, ref, atol=1e-5)


def test_regmean_of_identical_experts_is_that_expert_and_zero_inputs_keep_the_mean():
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(3, 5, generator=g)
    grams = [(lambda x: x.T @ x)(torch.randn(9, 5, generator=g)) for _ in range(3)]
    for alpha in (0.0, 0.5, 0.9, 1.0):
        assert torch.allclose(ops.regmean([tau] * 3, grams, alpha=alpha), tau, atol=1e-5)
    zero = torch.zeros(5, 5)
    taus = [torch.randn(3, 5, generator=g) for _ in range(2)]
    assert torch.allclose(ops.regmean(taus, [zero, zero]), (taus[0] + taus[1]) / 2)
    with pytest.raises(ConfigError, match="alpha"):
        ops.regmean(taus, [zero, zero], alpha=1.5)
    with pytest.raises(ConfigError, match="weights"):
        ops.regmean(taus, [zero, zero], weights=[1.0, -1.0])


# ------------------------------------------------------------------ infrastructure


def test_calibration_files_inputs_only_round_robin_and_per_expert(tmp_path):
    js = _write(tmp_path / "a.json", [json.dumps({"input": f"j{i}", "target": "T", "label": 0}) for i in range(3)])
    cs = tmp_path / "b.csv"
    cs.write_text('id,input,target\n0,"c0\nsecond line",x\n1,c1,y\n2,,z\n', encoding="utf-8")
    tx = _write(tmp_path / "c.txt", ["t0", "", "  ", "t1"])
    c = cal.load_calibration([js, str(cs), tx], n_experts=2, max_examples=5)
    assert c.prompts_for(0) == ["j0", "c0\nsecond line", "t0", "j1", "c1"] == c.prompts_for(1)
    assert "T" not in c.all_prompts()
    own = cal.load_calibration([js, f"1={tx}"], n_experts=2)
    assert own.prompts_for(0) == ["j0", "j1", "j2"] and own.prompts_for(1) == ["t0", "t1"]
    assert own.paths() == [js, tx]
    assert cal.overlapping_files(own, [tx, "hf:x"]) == [tx]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_input_json", "no 'input' field"),
    ("no_input_csv", "no 'input' column"),
    ("empty_inputs", "no usable prompt"),
    ("none", "--calibration-data FILES"),
    ("index", "expert index 5 out of range"),
    ("examples", "--calibration-examples must be a positive integer"),
    ("malformed", "malformed JSON"),
])
def test_calibration_errors_are_one_line(tmp_path, case, message):
    specs = {
        "missing": [str(tmp_path / "nope.json")],
        "no_input_json": [_write(tmp_path / "x.json", [json.dumps({"question": "q"})])],
        "no_input_csv": [_write(tmp_path / "x.csv", ["id,question", "0,q"])],
        "empty_inputs": [_write(tmp_path / "x.jsonl", [json.dumps({"input": "  "}), json.dumps({"input": ""})])],
        "none": [],
        "index": [f"5={_write(tmp_path / 'y.txt', ['p'])}"],
        "examples": [_write(tmp_path / "z.txt", ["p"])],
        "malformed": [_write(tmp_path / "m.json", ["{not json"])],
    }[case]
    with pytest.raises((ConfigError, DataError)) as info:
        cal.load_calibration(specs, n_experts=2, max_examples=0 if case == "examples" else 4, method="regmean")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_encode_truncates_long_prompts_and_batches_mask_padding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    long = " ".join(["word"] * 200)
    ids, n = cal.encode(tok, [long, "short"], max_len=16)
    assert n == 1 and len(ids[0]) == 16 and ids[0][0] == tok.bos_token_id
    assert ids[0][-3:] == tok(long)["input_ids"][-3:]  # the end is kept
    out = list(cal.batches([[1, 2, 3], [1], [1, 2]], pad_id=0, tokens_per_batch=6))
    assert [b["input_ids"].tolist() for b in out] == [[[1, 2, 3], [1, 2, 0]], [[1]]]
    assert out[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_input_grams_match_inputs_and_skip_padding():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(4, 2)  # same input as a: shares its Gram matrix
            self.c = torch.nn.Linear(3, 1)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            return self.c(self.a(h) + self.b(h).sum(-1, keepdim=True))

    model = Net()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with cal.InputGrams(model, ["a", "b", "c"]) as col:
        cal.run_forward(model, batch, col)
        cal.run_forward(model, batch, col)
    with torch.no_grad():
        h = model.emb(torch.tensor([1, 2, 3, 4, 5]))
        hc = model.a(h) + model.b(h).sum(-1, keepdim=True)
    assert torch.allclose(col.grams["a"], 2 * h.T @ h, atol=1e-5)
    assert col.grams["b"] is col.grams["a"] and col.alias == {"b": "a"}
    assert torch.allclose(col.grams["c"], 2 * hc.T @ hc, atol=1e-5)
    assert col.tokens == 10
    # stop: a forward pass ends after the last hooked module (c never runs)
    with cal.InputGrams(model, ["a"]) as col:
        assert cal.run_forward(model, batch, col) is None


def test_expert_weights_swap_and_restore_exactly():
    from llm_merging.model.engine import base_param_shapes, open_experts
    from llm_merging.model.refs import ModelRef

    model = tiny._load_base("decoder")
    expert = open_experts([(ModelRef.parse(str(tiny.lora_expert_dir("decoder", 0))), True)],
                          base_param_shapes(model))[0]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    name = "model.layers.1.self_attn.v_proj.weight"
    with cal.expert_weights(model, expert, None, lambda n, p: p.detach().float().clone()) as swapped:
        p = dict(model.named_parameters())[name]
        assert set(swapped) == expert.param_names() and p.data_ptr() != before[name][0]
        assert torch.allclose(p, before[name][1] + expert.delta(name, before[name][1]))
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n][0] and torch.equal(p.detach(), before[n][1])  # the same storage


# ------------------------------------------------------------------ the methods against separately loaded experts
def _expert_models(kind, n):
    from peft import PeftModel

    out = []
    for i in range(n):
        if kind == "lora":
            m = PeftModel.from_pretrained(tiny._load_base("decoder"), str(tiny.lora_expert_dir("decoder", i))).merge_and_unload()
        else:
            m = tiny._load_base("decoder").__class__.from_pretrained(str(tiny.full_expert_dir("decoder", i)))
        out.append(m.eval())
    return out


def _grams_by_prompt(model, modules, prompts, max_len=None):
    """Σ over prompts (each alone, no padding) of XᵀX of each module's input."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    grams = {m: 0 for m in modules}
    caught = {}
    hooks = [model.get_submodule(m).register_forward_hook(
        lambda mod, args, out, m=m: caught.__setitem__(m, args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for m in modules]
    with torch.no_grad():
        for p in prompts:
            ids = tok(p)["input_ids"]
            if max_len is not None and len(ids) > max_len:
                ids = ids[:1] + ids[len(ids) - max_len + 1:]
            model(input_ids=torch.tensor([ids]))
            for m in modules:
                grams[m] = grams[m] + caught[m].T @ caught[m]
    for h in hooks:
        h.remove()
    return grams


def _expected(w0, ws, grams, alpha):
    def red(g):
        return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
    lhs = sum(red(g) for g in grams)
    rhs = sum(w.double() @ red(g) for w, g in zip(ws, grams))
    return torch.linalg.solve(lhs, rhs.T).T  # (Σ Wᵢ G'ᵢ)(Σ G'ᵢ)⁻¹




LINEARS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
           "model.layers.1.self_attn.k_proj"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_regmean_matches_grams_of_separately_loaded_experts(tmp_path, kind):
    n = 3 if kind == "lora" else 2
    dirs = [str(tiny.lora_expert_dir("decoder", i) if kind == "lora" else tiny.full_expert_dir("decoder", i))
            for i in range(n)]
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    merged = _merged("regmean", dirs, prompts, {"alpha": 0.8}, calibration_tokens_per_batch=40)
    base = tiny._load_base("decoder")
    experts = _expert_models(kind, n)
    grams = [_grams_by_prompt(e, LINEARS, PROMPTS) for e in experts]
    got = dict(merged.base_model.named_parameters())
    for mod in LINEARS:
        ws = [e.get_submodule(mod).weight.detach() for e in experts]
        ref = _expected(base.get_submodule(mod).weight.detach(), ws, [g[mod] for g in grams], 0.8)
        assert torch.allclose(got[mod + ".weight"].double(), ref, atol=2e-4), mod
        mean = sum(w.double() for w in ws) / n
        if mod.endswith("layers.0.self_attn.q_proj") and kind == "lora":  # the same inputs for every expert
            assert torch.allclose(ref, mean, atol=1e-5)
        else:
            assert not torch.allclose(ref, mean, atol=1e-3)
    if kind == "full":  # norms and embeddings: the fallback, task arithmetic
        for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"):
            b = dict(base.named_parameters())[name].detach()
            ta = b + sum(dict(e.named_parameters())[name].detach() - b for e in experts)
            assert torch.allclose(got[name], ta, atol=1e-5), name
    rep = merged.calibration_report()
    assert rep["prompts_per_expert"] == [len(PROMPTS)] * n and rep["forward_passes"] >= n and rep["seconds"] > 0


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_regmean_in_groups_and_without_base_files_equals_one_group(tmp_path, monkeypatch, kind):
    expert_dir = tiny.full_expert_dir if kind == "full" else tiny.lora_expert_dir
    dirs = [str(expert_dir("decoder", i)) for i in range(2)]
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    one = _merged("regmean", dirs, prompts)
    assert one.groups_gathered == 1
    many = _merged("regmean", dirs, prompts, statistics_memory=1)  # one layer per group
    assert many.groups_gathered == (3 if kind == "full" else 2)  # layers 0, 1 (and the head: full experts)
    from llm_merging.merging import data_aware
    from llm_merging.model import engine

    # no base files: θ₀ of the parameters a pass already merged comes from the copies kept while merging.
    # Those copies must stay θ₀ while expert after expert is swapped in (they were once handed out to be
    # modified in place: full experts then differed by ~1e-6, LoRA experts by 0.29)
    opened = []
    for module in (engine, data_aware):
        monkeypatch.setattr(module, "open_base_reader", lambda *a, **k: opened.append(a))  # None: no reader
    copies = _merged("regmean", dirs, prompts, statistics_memory=1)
    assert opened
    a, b, c = (dict(m.base_model.named_parameters()) for m in (one, many, copies))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6) and torch.allclose(a[name], c[name], atol=1e-6), name


def test_regmean_plus_takes_later_inputs_from_the_merged_layers(tmp_path):
    dirs = [str(tiny.lora_expert_dir("decoder", i)) for i in range(3)]
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    plus = _merged("regmean_plus", dirs, prompts)
    plain = _merged("regmean", dirs, prompts)
    got = dict(plus.base_model.named_parameters())
    base = tiny._load_base("decoder")
    experts = _expert_models("lora", 3)
    layer0 = [n for n in got if n.startswith("model.layers.0.") or n.startswith("model.embed")]
    mods1 = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    hybrid_grams = []
    for e in experts:  # expert i's layer 1 fed by the merged layer 0
        params = dict(e.named_parameters())
        with torch.no_grad():
            for n in layer0:
                params[n].copy_(got[n])
        hybrid_grams.append(_grams_by_prompt(e, mods1, PROMPTS))
    for mod in mods1:
        ws = [e.get_submodule(mod).weight.detach() for e in experts]
        ref = _expected(base.get_submodule(mod).weight.detach(), ws, [g[mod] for g in hybrid_grams], 0.9)
        # float32 forward passes vs float64 Gram sums; regmean's layer-1 weights differ by 0.2 or more
        assert torch.allclose(got[mod + ".weight"].double(), ref, atol=1e-3), mod
    # layer 0 sees the same inputs in both methods; layer 1 does not
    p0 = "model.layers.0.self_attn.o_proj.weight"
    assert torch.allclose(got[p0], dict(plain.base_model.named_parameters())[p0], atol=1e-6)
    p1 = "model.layers.1.mlp.down_proj.weight"
    assert (got[p1] - dict(plain.base_model.named_parameters())[p1]).abs().max() > 1e-4
    assert plus.calibration_report()["forward_passes"] == 2 * 3  # one per layer per expert (one batch each)


def test_long_prompts_are_truncated_to_the_context(tmp_path):
    long = " ".join(["The quick brown fox"] * 100)
    prompts = _write(tmp_path / "p.txt", [long, "A summary is"])
    m = _merged("regmean", [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)], prompts, max_seq_len=12)
    assert m.calibration_report()["prompts_truncated"] == 1
    experts = _expert_models("lora", 2)
    mod = "model.layers.1.self_attn.o_proj"
    grams = [_grams_by_prompt(e, [mod], [long, "A summary is"], max_len=12)[mod] for e in experts]
    ref = _expected(tiny._load_base("decoder").get_submodule(mod).weight.detach(),
                    [e.get_submodule(mod).weight.detach() for e in experts], grams, 0.9)
    assert torch.allclose(dict(m.base_model.named_parameters())[mod + ".weight"].double(), ref, atol=2e-4)


# ------------------------------------------------------------------ CLI
def test_cli_regmean_with_calibration_files_reports_cost_and_optimism(tmp_path, capsys):
    sample = tiny.sample_data_files()
    code = main(["-m", "regmean_plus", "--tiny", "--output_folder", str(tmp_path), "--quiet", "--save", "none",
                 "--max-examples", "2", "-d", sample[0], "--calibration-data", sample[0], f"1={sample[1]}",
                 "--calibration-examples", "3", "--set", "alpha=0.5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "calibration" in out and "optimistic" in out
    rep = json.loads((tmp_path / "regmean_plus" / "report.json").read_text())
    c = rep["calibration"]
    assert c["optimistic"] is True and c["prompts_per_expert"] == [3, 3] and c["forward_passes"] == 4
    assert c["seconds"] > 0 and c["peak_rss_mib"] > 0 and rep["hyperparameters"]["alpha"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["-m", "regmean"], "method 'regmean' is data-aware: give unlabeled prompts with --calibration-data"),
    (["-m", "ties_merge", "--tiny", "--calibration-data", "x.txt"], "--calibration-data: method 'ties_merge' does not use"),
    (["-m", "regmean", "--tiny", "--calibration-data", "missing.json"], "file 'missing.json' does not exist"),
    (["-m", "regmean", "--tiny", "--calibration-examples", "0"], "--calibration-examples must be a positive integer"),
])
def test_cli_calibration_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    if args == ["-m", "regmean"]:  # tiny models without --tiny (which supplies sample prompts)
        args = args + ["--base-model", str(tiny.base_dir("decoder")), "--models",
                       *[str(tiny.lora_expert_dir("decoder", i)) for i in range(2)]]
    assert main([*args, "--no-eval", "--output_folder", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))


def test_search_over_alpha_reuses_the_statistics(tmp_path):
    from llm_merging.search import SearchConfig

    prompts = _write(tmp_path / "p.txt", PROMPTS)
    data = tiny.sample_data_files()[0]
    cfg = RunConfig(method="regmean", tiny=True, output_folder=str(tmp_path / "out"), evaluate=False, save="none",
                    progress=False, device="cpu", calibration=CalibrationConfig(data=[prompts, data]),
                    search=SearchConfig(entries=["alpha=0:1"], methods=["regmean"], data=[data], trials=3, examples=2))
    runner = Runner(cfg)
    assert runner.run() == 0, runner.report.get("error")
    rep = runner.report["search"]
    assert rep["trials"]["total"] == 3 and "regmean:alpha=0.0:1.0" in rep["space"]
    # Gram matrices gathered once for all candidates, once more for the final merge (a fresh model)
    assert runner.method.groups_gathered == 2
    c = runner.report["calibration"]
    assert c["files"] == [prompts, data] and c["optimistic"] is True and c["also_evaluated_or_searched"] == [data]


def test_encoder_decoder_experts_merge_layer_by_layer(tmp_path):
    """T5: encoder and decoder stacks (the decoder fed the prompt shifted right); regmean_plus runs one pass
    per layer of both stacks per expert, and layer 0 of the encoder is the experts' mean (same inputs)."""
    arch = "encoder_decoder"
    dirs = [str(tiny.lora_expert_dir(arch, i)) for i in range(2)]
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    m = instantiate("regmean_plus")
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir(arch)), None
    m.list_models, m.is_peft, m.device, m.progress = dirs, None, "cpu", False
    m.calibration_files = [prompts]
    m.preflight()
    m.merge()
    assert m.calibration_report()["forward_passes"] == 2 * 4  # 2 encoder + 2 decoder layers, 2 experts
    name = "encoder.block.0.layer.0.SelfAttention.q.weight"
    base = dict(tiny._load_base(arch).named_parameters())[name].detach()
    deltas = [e.delta(name, base) for e in m.experts]
    got = dict(m.base_model.named_parameters())[name].detach()
    assert torch.allclose(got, base + (deltas[0] + deltas[1]) / 2, atol=1e-5)


def test_groups_of_experts_touching_different_parameters_equal_one_group(tmp_path):
    """Expert i's inputs come from θ₀ + τᵢ: a parameter only another expert changes, already merged in an
    earlier group, is put back to θ₀ for expert i (review finding: it kept its merged value)."""
    dirs = [str(tiny.lora_expert_dir("decoder", i)) for i in range(3)]
    p = _write(tmp_path / "p.txt", PROMPTS)
    one = _merged("regmean", dirs, p)
    many = _merged("regmean", dirs, p, statistics_memory=1)
    assert (one.groups_gathered, many.groups_gathered) == (1, 2)
    a, b = (dict(m.base_model.named_parameters()) for m in (one, many))
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


@pytest.mark.parametrize("name", ["regmean", "regmean_plus"])
def test_spent_budget_stops_the_gram_collection(tmp_path, name):
    import inspect

    from llm_merging.core.errors import BudgetExceeded

    def stop():  # the budget is spent once the statistics passes begin (not before: the engine checks too)
        return any(f.function == "_gather" for f in inspect.stack())

    with pytest.raises(BudgetExceeded, match="input statistics"):
        _merged(name, [str(tiny.lora_expert_dir("decoder", i)) for i in range(2)],
                _write(tmp_path / "p.txt", PROMPTS), should_stop=stop)
