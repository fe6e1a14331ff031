"""Adapter fidelity: every adapter ``--save adapter`` writes reloads through PEFT (``PeftModel.from_pretrained``
on the base, ``merge_and_unload``) to the merged model, exactly where the merge is exact and within the reported
error where it is approximated; and one test per known way PEFT-style adapter merging goes silently wrong."""
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llm_merging.core.errors import LLMMergingError
from llm_merging.main import main
from llm_merging.merging.factory import instantiate
from llm_merging.model import tiny
from llm_merging.ops.svd import ENERGY_RTOL
from llm_merging.pipeline.phases.merge import adapter_writer

TOL = 1e-5


def _base():
    return AutoModelForCausalLM.from_pretrained(str(tiny.base_dir("decoder"))).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.state_dict().items()}


def _lora(path, seed: int, **config):
    """A PEFT adapter on the tiny decoder base with random nonzero A and B (``config``: LoraConfig's values);
    DoRA magnitudes are the base's column norms times 1 ± 10 %."""
    model = get_peft_model(_base(), LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    model.peft_config["default"].base_model_name_or_path = str(tiny.base_dir("decoder"))
    model.save_pretrained(str(path))
    return path


def _peft_merged(adapter_dir) -> dict[str, torch.Tensor]:
    """The model PEFT makes of the tiny base and the adapter at ``adapter_dir``."""
    return _state(PeftModel.from_pretrained(_base(), str(adapter_dir)).merge_and_unload())


def _peft_delta(adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW of one adapter as PEFT applies it."""
    base = _state(_base())
    return {n: w - base[n] for n, w in _peft_merged(adapter_dir).items()}


def _merge(method_name: str, experts, *, rank=None, energy=None, max_rank=None, **values):
    """``method_name`` merged in process over the tiny decoder base with ``--save adapter``'s writer (the run
    options set as ``--adapter-rank`` / ``--adapter-energy`` / ``--adapter-max-rank`` set them)."""
    m = instantiate(method_name)
    m.base_model_name, m.base_model_revision_id = str(tiny.base_dir("decoder")), None
    m.list_models, m.device, m.progress = [str(e) for e in experts], "cpu", False
    m.adapter_rank, m.adapter_energy, m.adapter_max_rank = rank, energy, max_rank
    m.set_hyperparameters(values)
    m.preflight()
    m.delta_sink = adapter_writer(m)
    m.merge()
    return m, _state(m.base_model)


def _save(m, tmp_path):
    return m.delta_sink.save(tmp_path / "adapter", str(tiny.base_dir("decoder")), {"method": m.name})


def _assert_same(got: dict, want: dict, tol: float = TOL) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=tol, msg=name)


def _lora_ranks(adapter_dir) -> dict[str, int]:
    """The rank PEFT gives each module when it loads the adapter."""
    model = PeftModel.from_pretrained(_base(), str(adapter_dir))
    return {name.removeprefix("base_model.model."): mod.lora_A["default"].weight.shape[0]
            for name, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}


# ---------------------------------------------------------------------------------------------------------------
# Linear merges of LoRAs at the summed rank: exact, and what PEFT reloads is what we merged

@pytest.fixture(scope="module")
def patterned(tmp_path_factory):
    """Two adapters whose ranks and alphas differ per module (rank_pattern / alpha_pattern), one rsLoRA."""
    root = tmp_path_factory.mktemp("patterned")
    a = _lora(root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"v_proj": 2, "down_proj": 6}, alpha_pattern={"down_proj": 3})
    b = _lora(root / "b", 2, r=3, lora_alpha=5, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True,
              rank_pattern={"model.layers.1.self_attn.q_proj": 7}, alpha_pattern={"o_proj": 11})
    return a, b


def test_rank_and_alpha_patterns_and_rslora_round_trip_through_peft(patterned, tmp_path):
    a, b = patterned
    m, merged = _merge("task_arithmetic", [a, b], weights=[0.6, 0.4], scale=1.3)
    base = _state(_base())
    da, db = _peft_delta(a), _peft_delta(b)  # each expert as PEFT applies it: rank/alpha patterns, rsLoRA scale
    _assert_same(merged, {n: base[n] + 1.3 * (0.6 * da[n] + 0.4 * db[n]) for n in base})
    path = _save(m, tmp_path)
    _assert_same(_peft_merged(path), merged)
    config = json.loads((path / "adapter_config.json").read_text())
    want = {}  # at the default rank every module keeps the sum of its inputs' ranks
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        want[f"{attn}.q_proj"] = 4 + (7 if layer == 1 else 3)
        want[f"{attn}.v_proj"] = 2
        want[f"{attn}.o_proj"] = 3
        want[f"{mlp}.down_proj"] = 6 + 3
    assert _lora_ranks(path) == want
    assert len(set(want.values())) > 1 and config["rank_pattern"]  # the ranks differ: the pattern carries them
    assert max(m.delta_sink.errors.values()) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# (a) cross terms: summing A's and B's gives (Σ Bᵢ)(Σ Aᵢ) = Σ BᵢAᵢ + Σ_{i≠j} BᵢAⱼ

def test_summing_loras_has_no_cross_terms(tmp_path):
    spec = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    a, b = _lora(tmp_path / "a", 11, **spec), _lora(tmp_path / "b", 12, **spec)
    m, merged = _merge("task_arithmetic", [a, b], weights=[0.7, 0.5])
    base = _state(_base())
    da, db = _peft_delta(a), _peft_delta(b)
    exact = {n: base[n] + 0.7 * da[n] + 0.5 * db[n] for n in base}
    _assert_same(merged, exact)
    _assert_same(_peft_merged(_save(m, tmp_path)), merged)

    # PEFT's own weighted combinations on the same adapters: "cat" stacks the factors (exact, the same model);
    # "linear" sums them, the cross-term pitfall, so it differs from the exact merge by far more than TOL
    peft_model = PeftModel.from_pretrained(_base(), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    for kind in ("cat", "linear"):
        peft_model.add_weighted_adapter(["a", "b"], [0.7, 0.5], kind, combination_type=kind)
    name = "model.layers.0.self_attn.q_proj.weight"
    deltas = {}
    for kind in ("cat", "linear"):
        peft_model.set_adapter(kind)
        layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
        deltas[kind] = layer.get_delta_weight(kind).detach()
    torch.testing.assert_close(deltas["cat"], merged[name] - base[name], rtol=0, atol=TOL)
    assert (deltas["linear"] - (merged[name] - base[name])).norm() > 0.1 * (merged[name] - base[name]).norm()


# ---------------------------------------------------------------------------------------------------------------
# (b) rank_pattern lost on save: the adapter we write reloads with its per-module ranks

def test_per_module_ranks_survive_save_and_reload(tmp_path):
    a = _lora(tmp_path / "a", 21, r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 5})
    b = _lora(tmp_path / "b", 22, r=6, lora_alpha=6, target_modules=["q_proj", "up_proj"],
              rank_pattern={"model.layers.0.self_attn.q_proj": 1})
    m, merged = _merge("task_arithmetic", [a, b], weights=[1.0, 1.0])
    path = _save(m, tmp_path)
    ranks = _lora_ranks(path)
    written = {mod: fa.shape[0] for mod, (fb, fa) in m.delta_sink.factors.items()}
    assert ranks == written
    assert ranks["model.layers.0.self_attn.q_proj"] == 3 and ranks["model.layers.1.self_attn.q_proj"] == 8
    assert ranks["model.layers.0.self_attn.k_proj"] == 5 and ranks["model.layers.0.mlp.up_proj"] == 6
    _assert_same(_peft_merged(path), merged)


# ---------------------------------------------------------------------------------------------------------------
# (c) rsLoRA merged with the wrong scale: ours use alpha/√r for use_rslora adapters

def test_rslora_experts_of_different_ranks_merge_and_reload_exactly(tmp_path):
    a = _lora(tmp_path / "a", 31, r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True)
    b = _lora(tmp_path / "b", 32, r=16, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True)
    m, merged = _merge("task_arithmetic", [a, b], weights=[0.5, 0.5])
    base = _state(_base())
    da, db = _peft_delta(a), _peft_delta(b)
    _assert_same(merged, {n: base[n] + 0.5 * da[n] + 0.5 * db[n] for n in base})
    # the rsLoRA scale from the factors directly: alpha/√r, not alpha/r (that would shrink b's ΔW by 4)
    from safetensors.torch import load_file

    name = "model.layers.1.self_attn.o_proj"
    t = load_file(str(b / "adapter_model.safetensors"))
    bb, ba = t[f"base_model.model.{name}.lora_B.weight"], t[f"base_model.model.{name}.lora_A.weight"]
    torch.testing.assert_close(db[name + ".weight"], 8 / math.sqrt(16) * bb @ ba, rtol=0, atol=TOL)
    assert (db[name + ".weight"] - 8 / 16 * bb @ ba).norm() > 0.5 * db[name + ".weight"].norm()
    _assert_same(_peft_merged(_save(m, tmp_path)), merged)


# ---------------------------------------------------------------------------------------------------------------
# (d) DoRA: merged exactly (as PEFT's merge_and_unload) or refused in one line, never silently wrong

def test_dora_experts_are_merged_exactly_or_refused(tmp_path):
    a = _lora(tmp_path / "a", 41, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    b = _lora(tmp_path / "b", 42, r=2, lora_alpha=2, target_modules=["q_proj", "o_proj"], use_dora=True)
    try:  # DoRA's ΔW = m ⊙ V/‖V‖ − W is not low rank: the adapter's rank comes from an energy
        m, merged = _merge("task_arithmetic", [a, b], energy=0.99, weights=[0.6, 0.4])
    except LLMMergingError as exc:
        text = str(exc)
        assert "\n" not in text and "DoRA" in text and "adapter" in text.lower(), text
        return
    base = _state(_base())
    da, db = _peft_delta(a), _peft_delta(b)
    _assert_same(merged, {n: base[n] + 0.6 * da[n] + 0.4 * db[n] for n in base})
    path = _save(m, tmp_path)  # a plain LoRA of the merged ΔW, within the reported error
    assert max(m.delta_sink.errors.values()) > 0
    _assert_within_reported_error(_peft_merged(path), merged, base, m.delta_sink.errors)
    m, merged = _merge("task_arithmetic", [a, b], rank=64, weights=[0.6, 0.4])  # full rank (capped): exact
    _assert_same(_peft_merged(_save(m, tmp_path / "exact")), merged)


def test_dora_or_full_experts_need_an_adapter_rank_or_energy(capsys, tmp_path):
    dora = _lora(tmp_path / "dora", 43, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    plain, full, base = tiny.lora_expert_dir("decoder", 0), tiny.full_expert_dir("decoder", 1), tiny.base_dir("decoder")
    capsys.readouterr()  # building the tiny models logs
    for expert, what in ((dora, "a DoRA adapter"), (full, "a full fine-tune")):
        code, err, out = _run(capsys, tmp_path, "-m", "task_arithmetic", "--base-model", str(base),
                              "--models", str(plain), str(expert), "--save", "adapter")
        assert code == 2 and len(err) == 1 and f"'{expert}' is {what}" in err[0], err
        assert "--adapter-rank R or --adapter-energy E" in err[0] and _files(out) == []


def test_adapter_config_reading_for_the_save_checks(tmp_path):
    from llm_merging.model.save import adapter_config_field, is_dora, read_adapter_config

    dora = _lora(tmp_path / "dora", 44, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    plain = tiny.lora_expert_dir("decoder", 0)
    assert read_adapter_config(dora) == json.loads((dora / "adapter_config.json").read_text())
    assert is_dora({"kind": "lora", "path": str(dora)}) and not is_dora({"kind": "lora", "path": str(plain)})
    assert adapter_config_field({"kind": "lora", "path": str(plain)}, "r") == json.loads(
        (plain / "adapter_config.json").read_text())["r"]
    # a full model, no path, no file, not JSON, not an object: None (loading the expert names the problem)
    (tmp_path / "bad").mkdir()
    (tmp_path / "list").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{r: ")
    (tmp_path / "list" / "adapter_config.json").write_text("[1]")
    assert not is_dora({"kind": "full", "path": str(dora)}) and adapter_config_field({"kind": "lora"}, "r") is None
    for folder in ("missing", "bad", "list"):
        assert read_adapter_config(tmp_path / folder) is None
        assert adapter_config_field({"kind": "lora", "path": str(tmp_path / folder)}, "r") is None


# ---------------------------------------------------------------------------------------------------------------
# Full fine-tunes and mixed experts: extracted by the same writer, reloaded within the reported error

def _assert_within_reported_error(reloaded: dict, merged: dict, base: dict, errors: dict[str, float],
                                  slack: float = 1e-4) -> None:
    """Every tensor of the reloaded model equals the merged one, up to each low-rank module's reported relative
    Frobenius error of ΔW; the tensors not in ``errors`` (modules_to_save, untouched ones) exactly."""
    assert set(reloaded) == set(merged)
    for name, value in merged.items():
        module = name.rpartition(".")[0]
        if module in errors and name.endswith(".weight"):
            delta = value - base[name]
            err = float((reloaded[name] - value).norm()) / max(float(delta.norm()), 1e-30)
            assert err <= errors[module] + slack, (name, err, errors[module])
        else:
            torch.testing.assert_close(reloaded[name], value, rtol=0, atol=TOL, msg=name)


def _energy_rank(delta: torch.Tensor, energy: float, max_rank: int | None) -> int:
    """The documented energy rule from an exact SVD: the smallest r whose σ₁² + … + σ_r² reach fraction
    ``energy`` of ‖ΔW‖_F² (less the documented slack ``ENERGY_RTOL``), at most ``max_rank``."""
    s2 = torch.linalg.svdvals(delta.double()) ** 2
    r = int(torch.searchsorted(torch.cumsum(s2, 0), (energy - ENERGY_RTOL) * s2.sum())) + 1
    return min(r, max_rank or r)


def _extract_report(path) -> dict:
    return json.loads((path / "extract_report.json").read_text())


@pytest.mark.parametrize("method,values,options", [
    ("task_arithmetic", {"weights": [0.6, 0.4]}, {"rank": 6}),
    ("task_arithmetic", {"weights": [0.6, 0.4]}, {"energy": 0.9}),
    ("ties_merge", {"density": 0.5}, {"rank": 6}),
    ("ties_merge", {"density": 0.5}, {"energy": 0.97, "max_rank": 10}),
])
def test_full_fine_tune_merge_as_an_adapter(method, values, options, tmp_path):
    experts = [tiny.full_expert_dir("decoder", i) for i in range(2)]
    m, merged = _merge(method, experts, **options, **values)
    path = _save(m, tmp_path)
    writer, base = m.delta_sink, _state(_base())
    assert writer.errors and max(writer.errors.values()) > 0  # full-rank ΔW: approximated, and reported
    _assert_within_reported_error(_peft_merged(path), merged, base, writer.errors)
    report = _extract_report(path)
    assert json.dumps(report) and report == json.loads(json.dumps(writer.report()))
    ranks = {mod: fa.shape[0] for mod, (fb, fa) in writer.factors.items()}
    assert _lora_ranks(path) == ranks
    for module, r in ranks.items():
        delta = merged[module + ".weight"] - base[module + ".weight"]
        want = options.get("rank") or _energy_rank(delta, options["energy"], options.get("max_rank"))
        assert r == min(want, *delta.shape), module


def test_mixed_lora_and_full_merge_as_an_adapter(tmp_path):
    experts = [tiny.lora_expert_dir("decoder", 1), tiny.full_expert_dir("decoder", 0)]
    m, merged = _merge("task_arithmetic", experts, energy=0.95, weights=[0.5, 0.5])
    base = _state(_base())
    dl = _peft_delta(experts[0])
    full = _state(AutoModelForCausalLM.from_pretrained(str(experts[1])))
    _assert_same(merged, {n: base[n] + 0.5 * dl[n] + 0.5 * (full[n] - base[n]) for n in base})
    path = _save(m, tmp_path)
    _assert_within_reported_error(_peft_merged(path), merged, base, m.delta_sink.errors)


# ---------------------------------------------------------------------------------------------------------------
# The run: flags, their --set aliases, one-line errors, report.json

def _run(capsys, tmp_path, *args):
    out = tmp_path / "out"
    code = main(["--output_folder", str(out), "--quiet", "--no-eval", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, out


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


BAD = {
    "energy zero": (["--save", "adapter", "--adapter-energy", "0"], "--adapter-energy must be in (0, 1]"),
    "energy above one": (["--save", "adapter", "--adapter-energy", "1.5"], "--adapter-energy must be in (0, 1]"),
    "energy nan": (["--save", "adapter", "--adapter-energy", "nan"], "--adapter-energy must be in (0, 1]"),
    "energy alias": (["--save", "adapter", "--set", "adapter_energy=2"], "--set adapter_energy must be in (0, 1]"),
    "rank zero": (["--save", "adapter", "--adapter-rank", "0"], "--adapter-rank must be a positive integer"),
    "rank alias": (["--save", "adapter", "--set", "adapter_rank=-3"], "--set adapter_rank must be a positive integer"),
    "max rank zero": (["--save", "adapter", "--adapter-energy", "0.9", "--adapter-max-rank", "0"],
                      "--adapter-max-rank must be a positive integer"),
    "rank and energy": (["--save", "adapter", "--adapter-rank", "4", "--adapter-energy", "0.9"],
                        "--adapter-rank and --adapter-energy both choose the adapter's rank"),
    "rank and energy alias": (["--save", "adapter", "--adapter-rank", "4", "--set", "adapter_energy=0.9"],
                              "--adapter-rank and --set adapter_energy both choose"),
    "rank without adapter": (["--save", "full", "--adapter-rank", "4"], "--adapter-rank sets the adapter"),
    "energy without adapter": (["--save", "none", "--adapter-energy", "0.9"], "--adapter-energy sets the adapter"),
    "alias without adapter": (["--set", "adapter_max_rank=8"], "--set adapter_max_rank sets the adapter"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_adapter_option_errors(case, capsys, tmp_path):
    args, message = BAD[case]
    code, err, out = _run(capsys, tmp_path, "-m", "task_arithmetic", "--tiny", *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _files(out) == []


def test_save_adapter_of_full_experts_from_the_command_line(capsys, tmp_path):
    base = tiny.base_dir("decoder")
    experts = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    code, err, out = _run(capsys, tmp_path, "-m", "ties_merge", "--base-model", str(base), "--models", *experts,
                          "--save", "adapter", "--adapter-energy", "0.9", "--set", "adapter_max_rank=12",
                          "density=0.5")
    assert code == 0, err
    folder = out / "ties_merge"
    report = json.loads((folder / "report.json").read_text())
    saved = report["saved"]
    assert saved["format"] == "adapter" and saved["options"] == {"rank": None, "energy": 0.9, "max_rank": 12}
    assert report["options"]["adapter_energy"] == 0.9 and report["options"]["adapter_max_rank"] == 12  # the alias
    assert saved["extraction"] == _extract_report(folder / "adapter")
    errors = saved["relative_error_by_module"]
    assert errors and 0 < saved["max_relative_error"] == max(errors.values())
    ranks = _lora_ranks(folder / "adapter")
    assert set(ranks) == set(errors) and max(ranks.values()) <= 12
    assert {m: v["rank"] for m, v in saved["extraction"]["modules"].items()} == ranks

    _, merged = _merge("ties_merge", experts, energy=0.9, max_rank=12, density=0.5)  # the same merge in process
    _assert_within_reported_error(_peft_merged(folder / "adapter"), merged, _state(_base()), errors)
    assert report["disk_space"]  # estimated before the merge


def test_save_adapter_of_loras_from_the_command_line_stays_exact(capsys, tmp_path):
    experts = [str(tiny.lora_expert_dir("decoder", i)) for i in range(3)]
    code, err, out = _run(capsys, tmp_path, "-m", "task_arithmetic", "--base-model", str(tiny.base_dir("decoder")),
                          "--models", *experts, "--save", "adapter")
    assert code == 0, err
    saved = json.loads((out / "task_arithmetic" / "report.json").read_text())["saved"]
    assert saved["max_relative_error"] < 1e-5 and saved["options"] == {"rank": None, "energy": None, "max_rank": None}
    _, merged = _merge("task_arithmetic", experts)
    _assert_same(_peft_merged(out / "task_arithmetic" / "adapter"), merged)


@pytest.mark.parametrize("options", [{"rank": 6}, {"energy": 0.5}, {"energy": 0.9, "max_rank": 3}])
def test_disk_estimate_of_an_adapter_of_full_experts(options, tmp_path):
    from llm_merging.model.save import adapter_estimate, header_values

    experts = [tiny.full_expert_dir("decoder", i) for i in range(2)]
    m, _ = _merge("task_arithmetic", experts, **options)
    written = sum(n * (2 if dtype in ("F16", "BF16") else 4)
                  for dtype, n in header_values(_save(m, tmp_path) / "adapter_model.safetensors").items())
    estimate = adapter_estimate([{"kind": "full", "path": str(e)} for e in experts], tiny.base_dir("decoder"),
                                m.adapter_rank or m.adapter_max_rank)
    if "max_rank" not in options and "rank" not in options:  # ranks unknown beforehand: each matrix's factors
        assert estimate >= written                               # counted as large as the matrix in float32
    else:  # every tensor of these experts changed: the estimate is the adapter's size
        assert estimate == written
