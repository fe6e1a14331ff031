"""The mergekit methods registered as ours (nuslerp, multislerp, karcher, sce, ram, ramplus_tl, nearswap,
arcee_fusion): a CLI run on tiny full fine-tunes equals the op applied to the raw checkpoints, and their
mergekit recipes map onto them."""
import pytest
import torch
from safetensors.torch import load_file

from llm_merging import ops
from llm_merging.model import tiny
from llm_merging.main import main
from llm_merging.merging.recipe import apply_recipe, load_recipe
from llm_merging.merging.factory import instantiate

NAME = "model.layers.1.mlp.down_proj.weight"


def _weights(path):
    return load_file(str(next(path.glob("*.safetensors"))))[NAME].to(torch.float32)


CASES = [
    # method, number of experts, --set, expected merged weights from (base, [expert weights])
    ("nuslerp", 2, ["weights=0.3,0.7"],
     lambda b, e: b + ops.nuslerp([x - b for x in e], [0.3, 0.7])),
    ("nuslerp", 2, ["weights=0.3,0.7", "nuslerp_flatten=false"],
     lambda b, e: b + ops.nuslerp([x - b for x in e], [0.3, 0.7], flatten=False)),
    ("multislerp", 3, ["weights=1,2,3"], lambda b, e: ops.multislerp(e, [1, 2, 3], base=b)),
    ("karcher", 2, [], lambda b, e: ops.karcher([b, *e])),
    ("sce", 3, ["select_topk=0.5"], lambda b, e: b + ops.sce([x - b for x in e], select_topk=0.5)),
    ("ram", 2, [], lambda b, e: b + ops.ram([x - b for x in e])),
    ("ramplus_tl", 3, ["r=0.5", "alpha=0.5"], lambda b, e: b + ops.ramplus_tl([x - b for x in e], r=0.5, alpha=0.5)),
    ("nearswap", 1, ["t=0.01"], lambda b, e: ops.nearswap(b, e[0], 0.01)),
    ("arcee_fusion", 1, [], lambda b, e: ops.arcee_fusion(b, e[0])),
]


@pytest.mark.parametrize("method, n, sets, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_cli_run_equals_the_op_on_the_checkpoints(capsys, tmp_path, method, n, sets, expected):
    base = tiny.base_dir("decoder")
    experts = [tiny.full_expert_dir("decoder", i) for i in range(n)]
    args = ["-m", method, "--base-model", str(base), "--models", *map(str, experts), "--output_folder",
            str(tmp_path), "--no-eval", "--quiet"]
    code = main(args + (["--set", *sets] if sets else []))
    assert code == 0, capsys.readouterr().err
    merged = load_file(str(tmp_path / method / "merged_model" / "model.safetensors"))[NAME]
    want = expected(_weights(base), [_weights(e) for e in experts])
    assert torch.allclose(merged, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, n", [("nuslerp", 1), ("nearswap", 2), ("arcee_fusion", 2)])
def test_model_count_is_checked_before_loading(capsys, tmp_path, method, n):
    experts = [str(tiny.full_expert_dir("decoder", i)) for i in range(n)]
    code = main(["-m", method, "--base-model", str(tiny.base_dir("decoder")), "--models", *experts, "--set", "t=0.1"]
                if method == "nearswap" else
                ["-m", method, "--base-model", str(tiny.base_dir("decoder")), "--models", *experts, "--output_folder",
                 str(tmp_path), "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and method in err[0]


def test_nearswap_needs_t(capsys, tmp_path):
    code = main(["-m", "nearswap", "--base-model", str(tiny.base_dir("decoder")), "--models",
                 str(tiny.full_expert_dir("decoder", 0)), "--output_folder", str(tmp_path), "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "needs t" in err[-1]


def _recipe(tmp_path, text):
    path = tmp_path / "r.yml"
    path.write_text(text)
    r = load_recipe(path)
    m = instantiate(r.method)
    apply_recipe(m, r)
    return r, m


def test_mergekit_recipes_map_onto_our_methods(tmp_path):
    base = str(tiny.base_dir("decoder"))
    e0, e1 = (str(tiny.full_expert_dir("decoder", i)) for i in range(2))
    r, m = _recipe(tmp_path, f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
                             f"  - model: {e0}\n    parameters: {{weight: 0.2}}\n"
                             f"  - model: {e1}\n    parameters: {{weight: 0.8}}\n")
    assert r.method == "nuslerp" and m.resolve_hparams(NAME)["weights"] == [0.2, 0.8]
    # karcher: mergekit adds the base to the inputs once; it becomes a τ = 0 model
    r, m = _recipe(tmp_path, f"merge_method: karcher\nbase_model: {base}\nmodels: [{e0}, {e1}]\n")
    assert r.models == [base, e0, e1] and m.hparams["include_base"] is False
    r, _ = _recipe(tmp_path, f"merge_method: karcher\nbase_model: {base}\nmodels: [{base}, {e0}]\n")
    assert r.models == [base, e0]
    r, m = _recipe(tmp_path, f"merge_method: sce\nbase_model: {base}\nmodels: [{base}, {e0}, {e1}]\n"
                             "parameters: {select_topk: 0.3, int8_mask: true}\n")
    assert r.models == [e0, e1] and m.hparams["select_topk"] == 0.3  # the listed base is the reference only
