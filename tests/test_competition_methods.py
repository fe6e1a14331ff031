"""PCB-Merging, MagMax, Consensus Merging (TALL masks on task arithmetic and TIES) and ExPO: each op against a
hand-written transcription of the authors' reference code (small random tensors), the edge cases, the CLI on
the tiny models (LoRA and full experts), and one-line errors for bad hyperparameters.

References (read, reimplemented; the transcriptions below follow their conventions):

* PCB: duguodong7/pcb-merging @ 31fa2dc, ``pcb-merging.py`` ``PCB_merge`` (paper eqs. 2-5: intra-balancing
  ``exp(N·Norm(|τ|)²)``, inter-balancing ``tanh(τᵢ ⊙ Σⱼτⱼ)``, drop by ``clamp(β, 1 − r, 0)``, rescale by
  min-max normalisation, ``Σ λᵢ sᵢ τ̃ᵢ / Σ sᵢ``), its ``clamp``/``normalize`` helpers (sort, Python ``int``
  truncation of ``d·ratio``) and ``nlp_source_code/merging.py`` ``get_score`` (per-task λ before weighting).
* MagMax: danielm1405/magmax @ 4f49f18, ``merge_max_abs`` (paper eq. 2, fold with ``>=``: ties to the last
  expert) and ``scaling_coef=0.5``.
* TALL masks / Consensus: nik-dim/tall_masks @ 088dc81, ``generate_task_masks`` (paper eq. 4, strict ``>``
  on the checkpoints), ``construct_consensus_mask`` (paper eq. 5, ``>= prun_thre_k``), ``create_task_vector``
  (TA: plain sum; TIES: ``ties_merging(reset_thresh=20, merge_func="dis-sum")`` with ``topk_values_mask``'s
  inclusive ``kthvalue`` threshold and ``resolve_zero_signs``).
* ExPO: chujiezheng/LLM-Extrapolation @ 04e04f5, ``code/extrapolate.py`` (paper eq. 2).
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.main import main
from llm_merging.model import tiny

NAME = "model.layers.1.mlp.down_proj.weight"


def rand_tvs(n=3, shape=(8, 25), seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# reference transcriptions (the authors' code, on flattened (N, d) task vectors)
# --------------------------------------------------------------------------------------------------


def ref_normalize(x, dim=0):
    lo, _ = torch.min(x, dim=dim, keepdim=True)
    hi, _ = torch.max(x, dim=dim, keepdim=True)
    return (x - lo) / (hi - lo)


def ref_clamp(x, min_ratio=0.0, max_ratio=0.0):
    d = x.size(1)
    s, _ = torch.sort(x, dim=1)
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def ref_pcb(tvs, ratio=0.1, lams=None, clamp=0.0001):
    """``PCB_merge`` + ``get_score``: the merged flat task vector, the clamped vectors and the weights."""
    checks = torch.stack([t.reshape(-1) for t in tvs])
    n, _ = checks.shape
    checks_abs = ref_clamp(torch.abs(checks), min_ratio=clamp, max_ratio=clamp)
    clamped = torch.sign(checks) * checks_abs
    self_pcb = ref_normalize(checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb_act = torch.tanh(checks * torch.sum(checks, dim=0))
    task_pcb = self_pcb_act * cross_pcb_act
    scale = ref_normalize(ref_clamp(task_pcb, 1 - ratio, 0), dim=1)
    lams = torch.ones(n) if lams is None else torch.tensor(lams, dtype=torch.float32)
    tvs_l = clamped * lams.unsqueeze(1)
    merged = torch.sum(tvs_l * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    return merged.reshape(tvs[0].shape), clamped, scale


def ref_merge_max_abs(tvs):
    """``merge_max_abs``: fold with ``|new| >= |best|`` (ties to the later expert)."""
    best = tvs[0]
    for t in tvs[1:]:
        best = torch.where(t.abs() >= best.abs(), t, best)
    return best


def ref_tall_masks_checkpoints(theta0, thetas, mtl, lam):
    """``generate_task_masks`` on checkpoints (float64 here, so that θ₀ + τ adds no rounding of note):
    ``|θ₀ − θₜ| > |θ_MTL − θₜ| · λ``, θ_MTL = θ₀ + τ_MTL."""
    flat_multi = theta0 + mtl
    return [(theta0 - th).abs() > (flat_multi - th).abs() * lam for th in thetas]


def ref_consensus(masks, k):
    """``construct_consensus_mask``: count the float masks, keep ``>= prun_thre_k``."""
    count = torch.zeros_like(masks[0], dtype=torch.float32)
    for m in masks:
        count = count + m.float()
    return count >= k


def ref_topk_values_mask(m, k_percent):
    """``topk_values_mask`` (K given in percent, < 100): keeps |m| >= its (d − int(d·K))-th smallest."""
    K = k_percent / 100
    n, d = m.shape
    k = d - int(d * K)
    kth, _ = m.abs().kthvalue(k, dim=1, keepdim=True)
    return m * (m.abs() >= kth)


def ref_ties_merging(flat, k_percent=20, merge_func="dis-sum"):
    """``ties_merging``: top-k (inclusive threshold), ``resolve_sign`` (sign of the sum, zeros filled with the
    majority sign), ``disjoint_merge`` (sum or mean of the entries with the elected sign)."""
    upd = ref_topk_values_mask(flat.clone(), k_percent)
    sign = torch.sign(upd.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, upd > 0, upd < 0)
    sel = upd * keep
    if merge_func.endswith("sum"):
        return sel.sum(dim=0)
    return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)


# --------------------------------------------------------------------------------------------------
# PCB-Merging
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, shape, ratio, lams, clamp", [
    (3, (8, 25), 0.1, None, 1e-4),
    (3, (40, 30), 0.2, [1.2, 0.8, 1.0], 1e-4),
    (2, (600,), 0.05, None, 0.01),  # the NLP scripts' clamp 0.01 (int(600·0.01) = 6 clipped per end)
    (4, (10, 10), 1.0, None, 1e-4),  # ratio 1: every entry but each task's lowest score
    (8, (50, 20), 0.1, None, 1e-4),
])
def test_pcb_matches_the_reference(n, shape, ratio, lams, clamp):
    tvs = rand_tvs(n, shape, seed=n, scale=0.3)
    want, want_clamped, want_scale = ref_pcb(tvs, ratio, lams, clamp)
    got_clamped, got_scale = ops.pcb_scores(tvs, ratio, clamp)
    assert torch.equal(got_clamped, want_clamped)
    assert torch.equal(got_scale > 0, want_scale > 0)  # the same entries kept
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-5, atol=1e-6)
    got = ops.pcb(tvs, ratio=ratio, weights=lams, clamp=clamp)
    assert got.shape == tvs[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.pcb(tvs, ratio=ratio, weights=lams, clamp=clamp, scale=1.7), 1.7 * want,
                               rtol=1e-5, atol=1e-6)


def test_pcb_keeps_about_the_top_ratio_of_each_task():
    """Ratio semantics: the entries strictly above the value at sorted index int(d·(1 − r)) keep a weight:
    d − int(d·(1 − r)) − 1 of them per task without ties (here 1000 − 900 − 1 = 99)."""
    tvs = rand_tvs(3, (1000,), seed=5)
    _, s = ops.pcb_scores(tvs, ratio=0.1)
    assert (s > 0).sum(dim=1).tolist() == [99, 99, 99]
    assert float(s.max()) == 1.0 and float(s.min()) == 0.0


def test_pcb_one_expert_is_its_clamped_top_entries():
    (tv,) = rand_tvs(1, (20, 20), seed=3)
    got = ops.pcb([tv], ratio=0.25)
    want, clamped, scale = ref_pcb([tv], 0.25)
    torch.testing.assert_close(got, want)
    kept = (scale[0] > 0).reshape(tv.shape)
    torch.testing.assert_close(got[kept], clamped[0].reshape(tv.shape)[kept])  # Σ sτ̃ / Σ s = τ̃ where kept
    assert torch.all(got[~kept] == 0)


def test_pcb_zero_and_constant_task_vectors_give_zero_not_nan():
    """Where the reference divides 0 by 0 in its min-max normalisation (NaN), ours gives 0."""
    zeros = [torch.zeros(6, 7) for _ in range(3)]
    assert torch.isnan(ref_pcb(zeros)[0]).all()
    assert torch.equal(ops.pcb(zeros), torch.zeros(6, 7))
    tiny_tensor = rand_tvs(2, (5,), seed=1)  # fewer than 1/ratio entries: none kept, 0 (reference: NaN)
    assert torch.equal(ops.pcb(tiny_tensor, ratio=0.1), torch.zeros(5))
    assert torch.equal(ops.pcb([torch.ones(1)]), torch.zeros(1))


def test_empty_tensors_give_empty_zeros():
    """An empty tensor (numel 0) gives zeros of its shape, as every op; PCB's quantiles and min-max would raise."""
    for shape in ((0,), (0, 5), (3, 0)):
        empty = [torch.zeros(shape, dtype=torch.float16) for _ in range(3)]
        for f in (lambda t: ops.pcb(t, ratio=0.1), lambda t: ops.pcb(t, weights=[1.0, 2.0, 0.5], scale=2.0),
                  lambda t: ops.magmax(t), lambda t: ops.consensus_ta(t), lambda t: ops.consensus_ties(t),
                  lambda t: ops.expo(t[0])):
            out = f(empty)
            assert out.shape == shape and out.dtype == torch.float32, shape
        clamped, scores = ops.pcb_scores(empty)
        assert clamped.shape == scores.shape == (3, 0)
    with pytest.raises(ConfigError, match="ratio"):  # the values are still checked
        ops.pcb([torch.zeros(0)] * 2, ratio=0.0)


def test_pcb_ties_in_magnitudes():
    """Integer-valued task vectors (many equal |τ|): the clamps and quantiles are values, so ties change
    nothing between us and the reference."""
    g = torch.Generator().manual_seed(4)
    tvs = [torch.randint(-3, 4, (30, 20), generator=g).float() * 0.01 for _ in range(3)]
    want = ref_pcb(tvs, 0.2)[0]
    torch.testing.assert_close(ops.pcb(tvs, ratio=0.2), want, rtol=1e-5, atol=1e-7)


def test_pcb_many_experts_do_not_overflow():
    """exp(N·Norm²) overflows float32 beyond N ≈ 88 in the reference; ours (exp(N·(Norm² − 1)), the same after
    the min-max normalisation) stays finite and equals the reference computed in float64."""
    tvs = rand_tvs(100, (4, 30), seed=7, scale=0.1)
    got = ops.pcb(tvs, ratio=0.2)
    assert torch.isfinite(got).all()
    want = ref_pcb([t.double() for t in tvs], 0.2, lams=None)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs, key", [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                                         ({"clamp": 0.5}, "clamp"), ({"clamp": -0.1}, "clamp"),
                                         ({"weights": [1.0, 2.0]}, "weights")])
def test_pcb_bad_values(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ops.pcb(rand_tvs(3), **kwargs)


# --------------------------------------------------------------------------------------------------
# MagMax
# --------------------------------------------------------------------------------------------------


def test_magmax_matches_the_reference():
    tvs = rand_tvs(4, (9, 11), seed=2)
    torch.testing.assert_close(ops.magmax(tvs, scale=1.0, tie_break="last"), ref_merge_max_abs(tvs), rtol=0, atol=0)
    torch.testing.assert_close(ops.magmax(tvs), 0.5 * ref_merge_max_abs(tvs), rtol=0, atol=0)  # default λ 0.5
    stacked = torch.stack(tvs)
    first = stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True))[0]  # argmax: first of equal maxima
    assert torch.equal(ops.magmax(tvs, scale=1.0), first)


def test_magmax_ties_lowest_index_by_default():
    x = torch.tensor([1.0, -2.0, 0.5, 0.0])
    tvs = [x, -x, torch.tensor([0.5, 1.0, -0.5, 0.0])]
    assert torch.equal(ops.magmax(tvs, scale=1.0), x)  # |x| = |−x| = |…|: expert 0 wins every tie
    assert torch.equal(ops.magmax(tvs, scale=1.0, tie_break="last"), torch.tensor([-1.0, 2.0, -0.5, 0.0]))
    assert torch.equal(ops.magmax(tvs, scale=1.0, tie_break="last"), ref_merge_max_abs(tvs))


def test_magmax_one_expert_and_zeros():
    (tv,) = rand_tvs(1)
    assert torch.equal(ops.magmax([tv], scale=0.7), tv * 0.7)
    assert torch.equal(ops.magmax([torch.zeros(3, 4)] * 3), torch.zeros(3, 4))
    with pytest.raises(ConfigError, match="tie_break"):
        ops.magmax([tv], tie_break="middle")


# --------------------------------------------------------------------------------------------------
# TALL masks and Consensus Merging
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.2, 0.6, [0.3, 0.5, 0.4, 0.2]])
def test_tall_masks_match_the_reference_on_checkpoints(lam):
    tvs = rand_tvs(4, (12, 13), seed=8, scale=0.02)
    g = torch.Generator().manual_seed(9)
    theta0 = torch.randn(12, 13, generator=g, dtype=torch.float64)
    thetas = [theta0 + t.double() for t in tvs]
    mtl = sum(tvs)
    lams = lam if isinstance(lam, list) else [lam] * 4
    want = [ref_tall_masks_checkpoints(theta0, [th], mtl.double(), lams[i])[0] for i, th in enumerate(thetas)]
    got = ops.tall_masks(tvs, mtl, lam)
    assert got.dtype == torch.bool and got.shape == (4, 12, 13)
    assert all(torch.equal(got[i], want[i]) for i in range(4))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5])
def test_consensus_ta_matches_the_reference(k):
    tvs = rand_tvs(4, (10, 10), seed=10)
    mtl = tvs[0] + tvs[1] + tvs[2] + tvs[3]  # the reference's tv_flat_checks.sum(0) (k=100: no top-k)
    masks = [t.abs() > (mtl - t).abs() * 0.6 for t in tvs]
    want = mtl * ref_consensus(masks, k)
    got = ops.consensus_ta(tvs, k=k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if k == 0:
        torch.testing.assert_close(got, ops.task_arithmetic(tvs))  # k = 0 is task arithmetic
    if k > 4:
        assert torch.equal(got, torch.zeros(10, 10))  # k above the number of tasks: the base model
    torch.testing.assert_close(ops.consensus_ta(tvs, k=k, scale=0.4), 0.4 * want)


def test_consensus_one_expert_and_zero_task_vectors():
    (tv,) = rand_tvs(1)
    # τ_MTL − τ = 0: the expert marks every nonzero entry; one mask never reaches k = 2
    assert torch.equal(ops.consensus_ta([tv]), torch.zeros_like(tv))
    assert torch.equal(ops.consensus_ta([tv], k=1), tv)
    assert torch.equal(ops.consensus_ta([torch.zeros(4, 4)] * 3, k=0), torch.zeros(4, 4))
    assert not ops.tall_masks([torch.zeros(4)] * 2, torch.zeros(4)).any()  # strict >: zeros never marked
    assert torch.equal(ops.consensus_ties([torch.zeros(4, 4)] * 3, k=1), torch.zeros(4, 4))


@pytest.mark.parametrize("divisor, merge_func", [(None, "dis-sum"), ("count", "dis-mean")])
def test_consensus_ties_matches_the_reference(divisor, merge_func):
    """Reference K = 20% of d = 60 keeps int(60·0.2) + 1 = 13 entries per task (inclusive threshold); our
    density 13/60 keeps round(13) = 13: the same trimmed vectors, election and disjoint merge."""
    tvs = rand_tvs(3, (60,), seed=11)
    flat = torch.stack(tvs)
    mtl_ref = ref_ties_merging(flat, 20, merge_func)
    mtl = ops.ties(tvs, density=13 / 60, divisor=divisor)
    torch.testing.assert_close(mtl, mtl_ref)
    masks = [t.abs() > (mtl_ref - t).abs() * 0.6 for t in tvs]
    for k in (0, 1, 2, 3):
        want = mtl_ref * ref_consensus(masks, k)
        got = ops.consensus_ties(tvs, k=k, density=13 / 60, divisor=divisor)
        torch.testing.assert_close(got, want)


def test_consensus_ties_ties_in_magnitudes_and_density_bounds():
    g = torch.Generator().manual_seed(12)
    tvs = [torch.randint(-2, 3, (20, 5), generator=g).float() for _ in range(3)]
    full = ops.consensus_ties(tvs, k=0, density=1.0)  # density 1: no trim; k 0: plain TIES (dis-sum)
    torch.testing.assert_close(full, ops.ties(tvs, density=1.0, divisor=None))
    tiny_d = ops.consensus_ties(tvs, k=1, density=0.01)  # one entry per task (ties: lowest flat index)
    assert int((tiny_d != 0).sum()) <= 3
    with pytest.raises(ConfigError, match="density"):
        ops.consensus_ties(tvs, density=0.0)


@pytest.mark.parametrize("call, key", [
    (lambda t: ops.consensus_ta(t, k=-1), "k"),
    (lambda t: ops.consensus_ta(t, k=1.5), "k"),
    (lambda t: ops.consensus_ta(t, tall_lambda=[0.5, 0.5]), "tall_lambda"),
    (lambda t: ops.consensus_ta(t, tall_lambda=-0.1), "tall_lambda"),
    (lambda t: ops.consensus_ties(t, divisor="weight_sum"), "divisor"),
])
def test_consensus_bad_values(call, key):
    with pytest.raises(ConfigError, match=key):
        call(rand_tvs(3))


# --------------------------------------------------------------------------------------------------
# ExPO
# --------------------------------------------------------------------------------------------------


def test_expo_matches_the_reference_and_task_arithmetic():
    g = torch.Generator().manual_seed(13)
    sft = torch.randn(7, 9, generator=g, dtype=torch.float64)
    dpo = sft + 0.01 * torch.randn(7, 9, generator=g, dtype=torch.float64)
    alpha = 0.3
    want = dpo + alpha * (dpo - sft)  # extrapolate.py
    tau = (dpo - sft).float()
    got = sft + ops.expo(tau, alpha).double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    assert torch.equal(ops.expo(tau, alpha), ops.task_arithmetic([tau], scale=1 + alpha))  # λ = 1 + α
    assert torch.equal(ops.expo(torch.zeros(3), 0.5), torch.zeros(3))
    for bad in (0.0, -0.5, math.inf):
        with pytest.raises(ConfigError, match="alpha"):
            ops.expo(tau, bad)


# --------------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_result():
    tvs = rand_tvs(3, (300, 70), seed=14, scale=0.05)
    cuda = [t.cuda() for t in tvs]
    for f in (lambda t: ops.pcb(t, ratio=0.1), lambda t: ops.magmax(t), lambda t: ops.consensus_ta(t),
              lambda t: ops.consensus_ties(t), lambda t: ops.expo(t[0])):
        a, b = f(tvs), f(cuda)
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-7)
    _, s_cpu = ops.pcb_scores(tvs)
    _, s_gpu = ops.pcb_scores(cuda)
    assert torch.equal(s_gpu.cpu() > 0, s_cpu > 0)
    assert torch.equal(ops.tall_masks(cuda, sum(cuda)).cpu(), ops.tall_masks(tvs, sum(tvs)))


# --------------------------------------------------------------------------------------------------
# end to end: the CLI on the tiny models
# --------------------------------------------------------------------------------------------------

METHODS = ["pcb_merging", "magmax", "consensus_ta", "consensus_ties", "expo"]


@pytest.mark.parametrize("method", METHODS)
def test_cli_tiny_lora_experts(capsys, tmp_path, method):
    code = main(["-m", method, "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / method / "report.json").is_file()


def _weights(path):
    return load_file(str(next(path.glob("*.safetensors"))))[NAME].to(torch.float32)


FULL_CASES = [
    ("pcb_merging", 3, ["ratio=0.2", "weights=1.2,1,0.8"],
     lambda b, e: b + ops.pcb([x - b for x in e], ratio=0.2, weights=[1.2, 1, 0.8])),
    ("magmax", 3, [], lambda b, e: b + ops.magmax([x - b for x in e], scale=0.5)),
    ("consensus_ta", 3, ["k=1", "tall_lambda=0.4"], lambda b, e: b + ops.consensus_ta([x - b for x in e], 1, 0.4)),
    ("consensus_ties", 3, [], lambda b, e: b + ops.consensus_ties([x - b for x in e])),
    ("expo", 1, ["alpha=0.5"], lambda b, e: e[0] + 0.5 * (e[0] - b)),
]


@pytest.mark.parametrize("method, n, sets, expected", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_cli_full_experts_equal_the_op_on_the_checkpoints(capsys, tmp_path, method, n, sets, expected):
    base = tiny.base_dir("decoder")
    experts = [tiny.full_expert_dir("decoder", i) for i in range(n)]
    args = ["-m", method, "--base-model", str(base), "--models", *map(str, experts), "--output_folder",
            str(tmp_path), "--no-eval", "--quiet"]
    code = main(args + (["--set", *sets] if sets else []))
    assert code == 0, capsys.readouterr().err
    merged = load_file(str(tmp_path / method / "merged_model" / "model.safetensors"))[NAME]
    want = expected(_weights(base), [_weights(e) for e in experts])
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, sets, key", [
    ("pcb_merging", ["ratio=0"], "ratio"),
    ("pcb_merging", ["clamp=0.2"], "clamp"),
    ("pcb_merging", ["weights=1,2,3,4"], "weights"),
    ("magmax", ["scale=-1"], "scale"),
    ("magmax", ["tie_break=middle"], "tie_break"),
    ("consensus_ta", ["k=-1"], "k"),
    ("consensus_ta", ["k=1.5"], "k"),
    ("consensus_ta", ["tall_lambda=0.2,0.3,0.4"], "tall_lambda"),
    ("consensus_ties", ["tall_lambda=-1"], "tall_lambda"),
    ("consensus_ties", ["density=0"], "density"),
    ("consensus_ties", ["divisor=weight_sum"], "divisor"),
    ("expo", ["alpha=0"], "alpha"),
    ("expo", ["alpha=-0.3"], "alpha"),
])
def test_bad_hyperparameters_are_one_line_errors_naming_the_key(capsys, tmp_path, method, sets, key):
    code = main(["-m", method, "--tiny", "--no-eval", "--save", "none", "--quiet", "--output_folder", str(tmp_path),
                 "--set", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"'{key}'" in err[0] or f"--set {key}=" in err[0], err  # the hyperparameter, or the --set item


def test_expo_is_task_arithmetic_with_scale_one_plus_alpha(capsys, tmp_path):
    args = ["--base-model", str(tiny.base_dir("decoder")), "--models", str(tiny.full_expert_dir("decoder", 0)),
            "--no-eval", "--quiet"]
    assert main(["-m", "expo", *args, "--output_folder", str(tmp_path / "a"), "--set", "alpha=0.3"]) == 0
    assert main(["-m", "task_arithmetic", *args, "--output_folder", str(tmp_path / "b"), "--set", "scale=1.3"]) == 0
    a = load_file(str(tmp_path / "a" / "expo" / "merged_model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "task_arithmetic" / "merged_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expo_takes_exactly_one_expert(capsys, tmp_path):
    experts = [str(tiny.full_expert_dir("decoder", i)) for i in range(2)]
    code = main(["-m", "expo", "--base-model", str(tiny.base_dir("decoder")), "--models", *experts,
                 "--output_folder", str(tmp_path), "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "expo" in err[0] and "exactly 1" in err[0], err
