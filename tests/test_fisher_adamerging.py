"""Fisher merging and AdaMerging: the math in ops against independent computations."""
import math

import pytest
import torch

from llm_merging import ops
from conftest import merged_method as _merged, write_lines as _write
from llm_merging.core.errors import ConfigError


# ------------------------------------------------------------------------------------------- fisher ops
def test_fisher_merge_closed_form_per_coordinate():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(5, 4, generator=g) for _ in range(3)]
    fishers = [torch.rand(5, 4, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0  # below the floor
    weights, eps = [0.5, 1.0, 2.0], 1e-3
    got = ops.fisher_merge(taus, fishers, weights=weights, eps=eps)
    for r in range(5):
        for c in range(4):
            f = [max(float(fishers[i][r, c]), eps) * weights[i] for i in range(3)]
            want = sum(fi * float(taus[i][r, c]) for i, fi in enumerate(f)) / sum(f)
            assert math.isclose(float(got[r, c]), want, rel_tol=1e-5, abs_tol=1e-6)
    # θ-space form of the paper: Σ wF θ / Σ wF, with θᵢ = θ₀ + τᵢ
    theta0 = torch.randn(5, 4, generator=g)
    fl = [f.clamp(min=eps) * w for f, w in zip(fishers, weights)]
    theta = sum(f * (theta0 + t) for f, t in zip(fl, taus)) / sum(fl)
    torch.testing.assert_close(theta0 + got, theta, rtol=1e-5, atol=1e-5)


def test_fisher_merge_identical_experts_and_floor():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(7, generator=g)
    fishers = [torch.rand(7, generator=g) for _ in range(3)]
    torch.testing.assert_close(ops.fisher_merge([tau, tau.clone(), tau.clone()], fishers), tau)
    zeros = [torch.zeros(7) for _ in range(2)]
    a, b = torch.randn(7, generator=g), torch.randn(7, generator=g)
    # every Fisher below ε: the plain mean; ε = 0 and no Fisher: the base (0)
    torch.testing.assert_close(ops.fisher_merge([a, b], zeros, eps=1e-6), (a + b) / 2)
    assert torch.equal(ops.fisher_merge([a, b], zeros, eps=0.0), torch.zeros(7))
    # one expert with Fisher far above the floor wins; a zero weight drops an expert
    big = [torch.full((7,), 1e3), torch.zeros(7)]
    torch.testing.assert_close(ops.fisher_merge([a, b], big, eps=1e-9), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ops.fisher_merge([a, b], big, weights=[0.0, 1.0], eps=1e-9), b)


def test_fisher_merge_bad_input():
    t = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(ConfigError, match="fishers"):
        ops.fisher_merge(t, [torch.zeros(3)])
    with pytest.raises(ConfigError, match="eps"):
        ops.fisher_merge(t, t, eps=-1.0)
    with pytest.raises(ConfigError, match="weights"):
        ops.fisher_merge(t, t, weights=[-1.0, 1.0])


def test_greedy_log_likelihood():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], requires_grad=True)
    lp = torch.log_softmax(logits.detach(), -1)
    want = float(lp[0, 0] + lp[1, 1])
    assert math.isclose(ops.greedy_log_likelihood(logits).item(), want, rel_tol=1e-6)
    mask = torch.tensor([False, True])
    assert math.isclose(ops.greedy_log_likelihood(logits, mask).item(), float(lp[1, 1]), rel_tol=1e-6)
    assert math.isclose(ops.greedy_log_likelihood(logits, reduce="mean").item(), want / 2, rel_tol=1e-6)
    ops.greedy_log_likelihood(logits).backward()  # d/dz log softmax(z)_k = e_k − p
    p = torch.softmax(logits.detach(), -1)
    torch.testing.assert_close(logits.grad, torch.eye(3)[[0, 1]] - p)


def test_diagonal_fisher_is_the_mean_of_per_example_squared_gradients():
    """The loop against torch.func's vectorised per-example gradients of a toy language model."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Tanh(), torch.nn.Linear(6, 11))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    tokens = torch.randint(0, 11, (9, 5))

    def loss_of(p, x):
        return ops.greedy_log_likelihood(functional_call(model, p, (x,)))

    fisher, n = ops.diagonal_fisher(lambda x: loss_of(params, x), list(tokens), params)
    assert n == 9
    per_example = vmap(grad(loss_of), in_dims=(None, 0))({k: v.detach() for k, v in params.items()}, tokens)
    for name, g in per_example.items():
        torch.testing.assert_close(fisher[name], (g ** 2).mean(0), rtol=1e-5, atol=1e-7)
    # half precision: the scaled backward pass gives the same Fisher; an overflowing scale is retried smaller
    half = {k: v.detach().half().requires_grad_(True) for k, v in params.items()}
    model16 = model.half()

    def loss16(x):
        return ops.greedy_log_likelihood(functional_call(model16, half, (x,)))

    for scale in (1024.0, 1e6):  # 1e6·ℓ overflows float16 gradients: run again at 1e6/64
        f16, _ = ops.diagonal_fisher(loss16, list(tokens), half, loss_scale=scale)
        for name, g in per_example.items():
            assert torch.isfinite(f16[name]).all()
            torch.testing.assert_close(f16[name], (g ** 2).mean(0), rtol=3e-2, atol=1e-4)
    model.float()
    # per-batch gradients give a different (smaller) estimate: the two are not interchangeable
    full = torch.autograd.grad(sum(loss_of(params, x) for x in tokens) / 9, params["2.weight"])[0]
    assert not torch.allclose(full ** 2, fisher["2.weight"])


# --------------------------------------------------------------------------------------- adamerging ops
def test_entropy_against_the_formula_and_masks():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ops.entropy(logits), -(p * p.log()).sum(-1))
    assert math.isclose(float(ops.entropy(logits)[1]), math.log(3), rel_tol=1e-6)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    q = torch.softmax(torch.tensor([1.0, 2.0]), -1)
    torch.testing.assert_close(ops.entropy(logits, mask), torch.stack([-(q * q.log()).sum(), torch.tensor(0.0)]))
    assert torch.isfinite(ops.entropy(torch.tensor([[1e4, -1e4]]))).all()
    # gradients: finite where entries are masked, equal to those of the unmasked sub-distribution
    x = torch.tensor([[0.3, -1.2, 2.0], [0.5, 0.1, 0.0]], requires_grad=True)
    ops.entropy(x, torch.tensor([[True, True, False], [False, False, False]])).sum().backward()
    y = x.detach()[0, :2].clone().requires_grad_(True)
    ops.entropy(y).backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros(3)) and x.grad[0, 2] == 0
    torch.testing.assert_close(x.grad[0, :2], y.grad)


def test_task_vector_inner_dense_and_factors():
    g = torch.Generator().manual_seed(2)
    grad_, b, a = torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    want = float((grad_.double() * (b @ a).double()).sum())
    assert math.isclose(ops.task_vector_inner(grad_, b @ a), want, rel_tol=1e-5)
    assert math.isclose(ops.task_vector_inner(grad_, factors=(b, a)), want, rel_tol=1e-5)
    with pytest.raises(ConfigError, match="do not fit"):
        ops.task_vector_inner(grad_, factors=(a, b))
    with pytest.raises(ConfigError, match="does not match"):
        ops.task_vector_inner(grad_, torch.zeros(5, 6))


# --------------------------------------------------------------------------- methods on the tiny models
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "A summary is", "Question: which one?",
           "According to the above context, choose the best option to answer the following question."]




def _dirs(kind, n):
    from llm_merging.model import tiny

    return [str(tiny.lora_expert_dir("decoder", i) if kind == "lora" else tiny.full_expert_dir("decoder", i))
            for i in range(n)]


def _expert_models(kind, n):
    """The experts loaded on their own: PEFT's merge_and_unload for adapters, the checkpoint for full models."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llm_merging.model import tiny

    out = []
    for d in _dirs(kind, n):
        base = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder")))
        m = PeftModel.from_pretrained(base, d).merge_and_unload() if kind == "lora" else AutoModelForCausalLM.from_pretrained(d)
        out.append(m.eval())
    return out




def _fisher_by_hand(model, prompts, positions="all"):
    """Per prompt, alone: backward of the mean over positions of log p(argmax_t), squared .grad, averaged."""
    from transformers import AutoTokenizer

    from llm_merging.model import tiny

    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    model.requires_grad_(True)
    for text in prompts:
        model.zero_grad()
        ids = torch.tensor([tok(text)["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        picked = logp.max(-1).values
        (picked.mean() if positions == "all" else picked[-1]).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.double() ** 2
    return {n: a / len(prompts) for n, a in acc.items()}


@pytest.mark.parametrize("kind, positions", [("lora", "all"), ("full", "last")])
def test_fisher_merge_matches_fisher_computed_by_hand(tmp_path, kind, positions):
    from llm_merging.model import tiny
    from transformers import AutoModelForCausalLM

    n = 3 if kind == "lora" else 2
    prompts = _write(tmp_path / "p.txt", PROMPTS)
    weights, eps = [1.0, 0.5, 2.0][:n], 1e-6
    m = _merged("fisher", _dirs(kind, n), prompts, {"weights": weights, "eps": eps, "positions": positions},
                fisher_memory=1 if kind == "full" else None)  # full: one parameter per chunk (one pass each)
    experts = _expert_models(kind, n)
    fishers = [_fisher_by_hand(e, PROMPTS, positions) for e in experts]
    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).named_parameters())
    got = dict(m.base_model.named_parameters())
    touched = set().union(*(e.param_names() for e in m.experts)) if m.experts else set()
    checked = 0
    for name, b in base.items():
        thetas = [dict(e.named_parameters())[name].detach().double() for e in experts]
        if all(torch.equal(t, b.detach().double()) for t in thetas):
            assert torch.equal(got[name], b), name  # no expert changes it: the base
            continue
        f = [fi[name].clamp(min=eps) * w for fi, w in zip(fishers, weights)]
        want = sum(fi * t for fi, t in zip(f, thetas)) / sum(f)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-4, atol=2e-5, msg=name)
        checked += 1
    assert checked >= (7 if kind == "lora" else 15)
    rep = m.calibration_report()
    assert rep["fisher"]["per_example_gradients"] and rep["fisher"]["prompts_per_expert"] == [len(PROMPTS)] * n
    assert rep["fisher"]["chunks"] == (len(touched) if kind == "full" else 1)
    assert rep["forward_passes"] == n * len(PROMPTS) * rep["fisher"]["chunks"]


def test_fisher_of_identical_experts_is_that_expert(tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = _write(tmp_path / "p.txt", PROMPTS[:2])
    d = _dirs("full", 1)[0]
    m = _merged("fisher", [d, d], prompts)
    want = dict(AutoModelForCausalLM.from_pretrained(d).named_parameters())
    for name, p in m.base_model.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ adamerging
ROWS = [{"input": "Is a cat an animal? Answer:", "answer_choices": ["yes", "no"], "label": 1},
        {"input": "The quick brown fox", "target": "jumps"},
        {"input": "Question: which one? Options: A. red B. blue C. green", "answer_choices": "['A', 'B', 'C']",
         "label": 2},
        {"input": "A summary is"}]


def _rows_file(tmp_path):
    import json

    return _write(tmp_path / "rows.json", [json.dumps(r) for r in ROWS])


def _prepared(kind, n, prompts_file, values=None):
    """An adamerging method with its base loaded and a pass started (λ not learned: steps=0)."""
    from llm_merging.model import tiny
    from llm_merging.model.engine import base_param_shapes
    from llm_merging.merging.factory import instantiate

    m = instantiate("adamerging")
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.is_peft, m.device, m.progress = _dirs(kind, n), None, "cpu", False
    m.calibration_files = [prompts_file]
    m.calibration_tokens_per_batch = 24  # several batches of each kind
    m.set_hyperparameters({"steps": 0, **(values or {})})
    m.preflight()
    m._load_base_model()
    m._load_tokenizer()
    m.experts = m.open_experts(base_param_shapes(m.base_model))
    m._start_pass()
    return m


def _entropy_by_hand(model, params):
    """Mean over ROWS of the entropy of the merged model's prediction distribution, each prompt alone:
    choices scored by log p(prompt + choice tokens) (no BOS, EOS appended), else the next token."""
    import ast

    from torch.func import functional_call
    from transformers import AutoTokenizer

    from llm_merging.model import tiny

    tok = AutoTokenizer.from_pretrained(str(tiny.base_dir("decoder")))
    total = 0
    for row in ROWS:
        p = tok(row["input"])["input_ids"]
        if "answer_choices" not in row:
            logits = functional_call(model, params, (torch.tensor([p]),)).logits[0, -1]
            dist = torch.log_softmax(logits, -1)
        else:
            choices = row["answer_choices"]
            choices = ast.literal_eval(choices) if isinstance(choices, str) else choices
            scores = []
            for c in choices:
                cids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                logp = torch.log_softmax(functional_call(model, params, (torch.tensor([p + cids]),)).logits[0], -1)
                scores.append(sum(logp[len(p) - 1 + k, t] for k, t in enumerate(cids)))
            dist = torch.log_softmax(torch.stack(scores), -1)
        total = total + -(dist.exp() * dist).sum()
    return total / len(ROWS)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adamerging_gradient_matches_autograd_through_an_explicit_merge(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    from llm_merging.model import tiny

    n = 2
    m = _prepared(kind, n, _rows_file(tmp_path))
    groups = ["model.layers.0", "model.layers.1"] if kind == "lora" else \
        ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert m.groups == groups and len(m.calibration.choices) == 2
    g = torch.Generator().manual_seed(3)
    lam0 = (0.3 + 0.6 * torch.rand(n, len(groups), generator=g)).float()
    rows = m._rows()
    with m._session() as (orig, params):
        h, grad = m._evaluate(lam0, rows, orig, params, grad=True)
        k = int(grad.abs().argmax())  # central difference along the steepest coordinate (float32 model)
        delta = 0.005
        e = torch.zeros(lam0.numel())
        e[k] = delta
        e = e.view_as(lam0)
        fd = (m._evaluate(lam0 + e, rows, orig, params, grad=False)[0]
              - m._evaluate(lam0 - e, rows, orig, params, grad=False)[0]) / (2 * delta)
    assert all(torch.equal(p.data, q) for p, q in zip(m.base_model.parameters(),
                                                      AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).parameters()))
    # independent: θ(λ) = θ₀ + Σ λᵢ,g τᵢ from the separately loaded experts, autograd to λ
    base = AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).eval()
    theta0 = {k: v.detach() for k, v in base.named_parameters()}
    experts = [dict(e.named_parameters()) for e in _expert_models(kind, n)]
    lam = lam0.clone().double().requires_grad_(True)
    merged = {}
    for name, t0 in theta0.items():
        taus = [ex[name].detach() - t0 for ex in experts]
        if not any(t.any() for t in taus):
            merged[name] = t0
            continue
        col = groups.index(name.rsplit(".", 1)[0] if "layers" not in name else ".".join(name.split(".")[:3]))
        merged[name] = t0 + sum(lam[i, col].float() * taus[i] for i in range(n))
    want_h = _entropy_by_hand(base, merged)
    want = torch.autograd.grad(want_h, lam)[0]
    assert math.isclose(h, want_h.item(), rel_tol=1e-4)
    torch.testing.assert_close(grad.double(), want, rtol=2e-3, atol=1e-5)
    assert math.isclose(fd, float(grad.view(-1)[k]), rel_tol=3e-2)


def test_adamerging_lowers_the_entropy_respects_the_clamp_and_merges_with_the_learned_lambdas(tmp_path):
    from transformers import AutoModelForCausalLM

    from llm_merging.model import tiny

    rows = _rows_file(tmp_path)
    m = _merged("adamerging", _dirs("lora", 2), rows, {"steps": 4, "lr": 0.01, "scale": 0.5})
    rep = m.calibration_report()["adamerging"]
    h = rep["entropy_per_step"]
    assert len(h) == 5 and all(b < a for a, b in zip(h, h[1:])), h
    lam = torch.tensor(list(rep["lambdas"].values())).T  # (experts, groups)
    assert not torch.allclose(lam, torch.full_like(lam, 0.5)) and rep["choice_prompts"] == 2
    base = dict(AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).named_parameters())
    experts = [dict(e.named_parameters()) for e in _expert_models("lora", 2)]
    got = dict(m.base_model.named_parameters())
    for name, t0 in base.items():
        col = list(rep["lambdas"]).index(".".join(name.split(".")[:3])) if "layers" in name else None
        want = t0 + sum(lam[i, col] * (ex[name] - t0) for i, ex in enumerate(experts)) if col is not None else t0
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=name)
    clamped = _merged("adamerging", _dirs("lora", 2), rows, {"steps": 2, "lr": 0.5, "lambda_min": 0.3,
                                                             "lambda_max": 0.6, "granularity": "task"})
    lams = clamped.calibration_report()["adamerging"]["lambdas"]
    assert list(lams) == ["all"] and all(0.3 <= v <= 0.6 for v in lams["all"])
    with pytest.raises(ConfigError, match="lambda_min 0.8 is above lambda_max 0.5"):
        clamped.set_hyperparameters({"lambda_min": 0.8, "lambda_max": 0.5})


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_adamerging_without_steps_is_task_arithmetic_exactly(tmp_path, kind):
    values = {"weights": [0.7, 0.4], "scale": 0.8}
    a = _merged("adamerging", _dirs(kind, 2), _rows_file(tmp_path), {**values, "steps": 0})
    t = _merged("task_arithmetic", _dirs(kind, 2), _rows_file(tmp_path), values)
    assert a.calibration_report()["forward_passes"] == 0
    for (n, p), (_, q) in zip(a.base_model.named_parameters(), t.base_model.named_parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------------------------- search and CLI
@pytest.mark.parametrize("method, entries, counter, expected", [
    ("fisher", ["eps=1e-12:1e-6:log", "weights[*]"], "gathered", 2),  # once for the trials, once for the final merge
    ("adamerging", ["lr=0.005:0.05:log", "steps=1:2"], "optimised", None),
])
def test_search_over_fisher_and_adamerging_hyperparameters(tmp_path, method, entries, counter, expected):
    from llm_merging.model import tiny
    from llm_merging.pipeline import CalibrationConfig, RunConfig, Runner
    from llm_merging.search import SearchConfig

    prompts = _write(tmp_path / "p.txt", PROMPTS[:3])
    cfg = RunConfig(method=method, tiny=True, output_folder=str(tmp_path / "out"), evaluate=False, save="none",
                    progress=False, device="cpu", calibration=CalibrationConfig(data=[prompts]),
                    search=SearchConfig(entries=entries, methods=[method], data=[tiny.sample_data_files()[0]],
                                        trials=2, examples=2))
    runner = Runner(cfg)
    assert runner.run() == 0, runner.report.get("error")
    rep = runner.report["search"]
    assert rep["trials"]["total"] == 2 and any(s.startswith(f"{method}:{entries[0].split('=')[0]}") for s in rep["space"])
    if expected is not None:
        assert getattr(runner.method, counter) == expected
    else:  # λ is learned again for each candidate's values, and for the final merge unless the last was best
        assert getattr(runner.method, counter) in (2, 3)
        assert "adamerging" in runner.report["calibration"]


def test_calibration_keeps_answer_choices_but_never_labels(tmp_path):
    import json

    from llm_merging.merging import calibration as cal
    from llm_merging.core.errors import DataError

    a = cal.load_calibration([_rows_file(tmp_path)], n_experts=2)
    relabelled = [dict(r, label=0, target="other") for r in ROWS]
    b = cal.load_calibration([_write(tmp_path / "b.json", [json.dumps(r) for r in relabelled])], n_experts=2)
    assert a.choices == b.choices == {ROWS[0]["input"]: ["yes", "no"], ROWS[2]["input"]: ["A", "B", "C"]}
    assert a.shared == b.shared == [r["input"] for r in ROWS]
    bad = _write(tmp_path / "bad.json", [json.dumps({"input": "x", "answer_choices": "['a', "})])
    with pytest.raises(DataError, match="bad.json: line 1: 'answer_choices' is not a list") as info:
        cal.load_calibration([bad], n_experts=1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("method, values", [("fisher", ["positions=last"]), ("adamerging", ["steps=1"])])
def test_cli_reports_fisher_and_learned_lambdas(tmp_path, capsys, method, values):
    import json

    from llm_merging.main import main

    code = main(["-m", method, "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path),
                 "--calibration-data", _rows_file(tmp_path), "--set", *values])
    assert code == 0
    assert "calibration" in capsys.readouterr().out
    c = json.loads((tmp_path / method / "report.json").read_text())["calibration"]
    assert c["prompts_per_expert"] == [len(ROWS)] * 2 and c["seconds"] > 0
    if method == "fisher":
        assert c["fisher"]["positions"] == "last" and c["fisher"]["disk_mib"] > 0
        assert c["forward_passes"] == 2 * len(ROWS)
    else:
        a = c["adamerging"]
        assert set(a["lambdas"]) == {"model.layers.0", "model.layers.1"} and len(a["entropy_per_step"]) == 2
        assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in a["lambdas"].values())
        assert a["choice_prompts"] == 2


def test_fisher_encoder_decoder_predicts_the_first_output_token(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llm_merging.model import tiny
    from llm_merging.merging.factory import instantiate

    prompts = _write(tmp_path / "p.txt", PROMPTS[:3])
    m = instantiate("fisher")
    base_dir = str(tiny.base_dir("encoder_decoder"))
    dirs = [str(tiny.lora_expert_dir("encoder_decoder", i)) for i in range(2)]
    m.base_model_name, m.base_model_revision_id = base_dir, None
    m.list_models, m.is_peft, m.device, m.progress = dirs, None, "cpu", False
    m.calibration_files = [prompts]
    m.set_hyperparameters({"eps": 1e-6})
    m.preflight()
    m.merge()
    tok = AutoTokenizer.from_pretrained(base_dir)
    thetas, fishers = [], []
    for d in dirs:
        e = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), d).merge_and_unload().eval()
        e.requires_grad_(True)
        acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in e.named_parameters()}
        for text in PROMPTS[:3]:
            e.zero_grad()
            out = e(input_ids=torch.tensor([tok(text)["input_ids"]]),
                    decoder_input_ids=torch.tensor([[e.config.decoder_start_token_id]]))
            torch.log_softmax(out.logits[0, 0].double(), -1).max().backward()
            for n, p in e.named_parameters():
                if p.grad is not None:
                    acc[n] += p.grad.double() ** 2
        thetas.append({n: p.detach().double() for n, p in e.named_parameters()})
        fishers.append({n: a / 3 for n, a in acc.items()})
    got = dict(m.base_model.named_parameters())
    name = "encoder.block.1.layer.0.SelfAttention.q.weight"
    f = [fi[name].clamp(min=1e-6) for fi in fishers]
    want = sum(fi * t[name] for fi, t in zip(f, thetas)) / sum(f)
    # float32 gradients vs the float64 reference: Fisher within ~3e-4, times |θ₁ − θ₂| of these random LoRAs
    torch.testing.assert_close(got[name].double(), want, rtol=1e-3, atol=1e-4)


def test_adamerging_gradient_does_not_depend_on_batching_and_survives_out_of_memory(tmp_path, monkeypatch):
    m = _prepared("lora", 2, _rows_file(tmp_path))
    lam = torch.full((2, len(m.groups)), 0.6)
    rows = m._rows()
    with m._session() as (orig, params):
        m.gradient_tokens_per_batch = 4096  # every row in one or two batches
        h1, g1 = m._evaluate(lam, rows, orig, params, grad=True)
        m.gradient_tokens_per_batch = 8  # one row (all its choices) per batch
        h2, g2 = m._evaluate(lam, rows, orig, params, grad=True)
        real, calls = m._choice_scores, []

        def flaky(chunk, pad, device):  # the first multiple-choice batch runs out of memory
            calls.append(len(chunk))
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("simulated")
            return real(chunk, pad, device)

        monkeypatch.setattr(m, "_choice_scores", flaky)
        m.gradient_tokens_per_batch = 4096
        h3, g3 = m._evaluate(lam, rows, orig, params, grad=True)
    assert m.gradient_tokens_per_batch == 2048 and len(calls) >= 2
    assert math.isclose(h1, h2, rel_tol=1e-5) and math.isclose(h1, h3, rel_tol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g1, g3, rtol=1e-4, atol=1e-7)


def test_fisher_without_disk_space_is_a_one_line_error(tmp_path, monkeypatch):
    import collections

    import llm_merging.merging.Fisher as fisher_module

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(fisher_module.shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    with pytest.raises(ConfigError, match="GiB of temporary disk .* set TMPDIR") as info:
        _merged("fisher", _dirs("lora", 2), _write(tmp_path / "p.txt", PROMPTS[:1]))
    assert "\n" not in str(info.value)
