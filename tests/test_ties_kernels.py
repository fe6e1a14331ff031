"""The TIES kernels (ops.ties.consensus_merge, the chunked top-k trim and radix select of ops.streaming)
against independent float32 references, bit for bit, including the signs of zeros and non-finite inputs."""
import numpy as np
import pytest
import torch

from llm_merging import ops
from llm_merging.ops import masks
from llm_merging.ops import streaming as st

SMALL_BLOCK = 256


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(masks, "BLOCK", SMALL_BLOCK)
    monkeypatch.setattr(st, "BLOCK", SMALL_BLOCK)


def _reference_consensus(xs, w, sign_method, weighted_sign, divisor):
    """The definition in numpy float32, one model at a time in order (the rounding order of the kernels)."""
    ys = [np.asarray(x, dtype=np.float32) * np.float32(wi) if weighted_sign else np.asarray(x, dtype=np.float32)
          for x, wi in zip(xs, w)]
    votes = ys if sign_method == "total" else [np.sign(y) for y in ys]
    score = votes[0].copy()
    for v in votes[1:]:
        score = score + v
    gamma = np.where(score >= 0, np.float32(1), np.float32(-1)).astype(np.float32)
    num = np.zeros_like(score)
    den = np.zeros_like(score)
    for y, wi in zip(ys, w):
        agree = (y * gamma) > 0
        num = num + np.where(agree, y if weighted_sign else y * np.float32(wi), np.float32(0))
        den = den + np.where(agree, np.float32(1) if divisor == "count" else np.float32(wi), np.float32(0))
    if divisor == "count":
        return num / np.maximum(den, np.float32(1))
    if divisor == "weight_sum":
        return num / np.where(den == 0, np.float32(1), den)
    return num


def _same_bits(got: torch.Tensor, ref) -> bool:
    """Equal values, NaN where NaN, and the same sign on every zero."""
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float32))
    return got.shape == ref.shape and torch.equal(got.view(torch.int32), ref.view(torch.int32))


def _hard_inputs(n=4096, seed=0):
    """fp16-like values with zeros, −0.0, exact cancellations (score 0) and agreeing pairs."""
    g = torch.Generator().manual_seed(seed)
    xs = [(0.01 * torch.randn(n, generator=g)).half().float() for _ in range(3)]
    xs[1][: n // 4] = 0.0
    xs[2][n // 4 : n // 2] = -0.0
    xs[1][n // 2 : 3 * n // 4] = -xs[0][n // 2 : 3 * n // 4]  # Σ = x₂ there, and 0 where x₂ = 0
    xs[2][n // 2 : 5 * n // 8] = 0.0
    xs[0][-8:] = 0.0
    xs[1][-8:] = -0.0
    xs[2][-8:] = -0.0
    return xs


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("weighted_sign", [False, True])
@pytest.mark.parametrize("divisor", ["count", "weight_sum", None])
@pytest.mark.parametrize("w", [[0.5, 0.3, 0.2], [0.7, -0.4, 0.2], [0.5, 0.0, 0.5], [-1.0, -0.5, 2.0]])
def test_consensus_merge_is_the_definition_bit_for_bit(sign_method, weighted_sign, divisor, w):
    xs = _hard_inputs()
    ref = _reference_consensus([x.numpy() for x in xs], w, sign_method, weighted_sign, divisor)
    got_list = ops.consensus_merge([x.clone() for x in xs], w, sign_method=sign_method,
                                   weighted_sign=weighted_sign, divisor=divisor)
    got_stacked = ops.consensus_merge(torch.stack(xs), w, sign_method=sign_method, weighted_sign=weighted_sign,
                                      divisor=divisor)
    assert _same_bits(got_list, ref) and _same_bits(got_stacked, ref)


@pytest.mark.parametrize("divisor", ["count", "weight_sum", None])
def test_consensus_merge_with_nan_and_inf_is_the_definition(divisor):
    xs = _hard_inputs(seed=1)
    xs[0][5], xs[1][6], xs[2][7] = float("nan"), float("inf"), -float("inf")
    w = [0.5, 0.3, 0.2]
    ref = _reference_consensus([x.numpy() for x in xs], w, "total", True, divisor)
    with np.errstate(invalid="ignore"):
        got = ops.consensus_merge([x.clone() for x in xs], w, weighted_sign=True, divisor=divisor)
    assert _same_bits(got, ref)


def test_elect_sign_ties_and_nan_elect_as_documented():
    stacked = torch.tensor([[1.0, -0.0, -2.0, float("nan"), 0.0], [-1.0, -0.0, 1.0, 1.0, 0.0]])
    assert ops.elect_sign(stacked).tolist() == [1.0, 1.0, -1.0, -1.0, 1.0]


@pytest.fixture(params=["radix", "sampled"])
def threshold_path(request, monkeypatch):
    """The two-pass radix select, or the sample + window pass (forced on small tensors)."""
    monkeypatch.setattr(st, "_SAMPLE_FROM", 0 if request.param == "sampled" else 1 << 62)
    return request.param


def _read(tvs):
    return lambda s, e: (None, [t[s:e] for t in tvs])


def _chunked(tvs, chunk, **kw):
    n = tvs[0].numel()
    out = torch.full((n,), 7.0)
    for s, e, m in st.ties_chunks(_read(tvs), n, n_models=len(tvs), chunk=chunk, **kw):
        out[s:e] = m
    return out


def _reference_ties(tvs, density, w, keep_count="round", **kw):
    """Trim with masks.magnitude_mask (kthvalue), then the numpy definition."""
    trimmed = [torch.where(masks.magnitude_mask(t, density, keep_count), t, 0.0).numpy() for t in tvs]
    return _reference_consensus(trimmed, w, kw.get("sign_method", "total"), kw.get("weighted_sign", False),
                                kw.get("divisor", "count"))


@pytest.mark.parametrize("chunk", [SMALL_BLOCK, 5 * SMALL_BLOCK, 1 << 20])
def test_ties_with_many_zeros_zero_threshold(chunk, threshold_path):
    """More zeros than dropped entries: the k-th largest |τ| is 0 (the trim keeps every nonzero entry)."""
    g = torch.Generator().manual_seed(3)
    n = 40 * SMALL_BLOCK + 17
    tvs = [(0.01 * torch.randn(n, generator=g)).half().float() for _ in range(3)]
    tvs[0][n // 5 :] = 0.0
    tvs[0][n // 3 : n // 2] = -0.0
    w = [0.5, 0.3, 0.2]
    kw = {"weighted_sign": True, "divisor": "weight_sum"}
    (t, need), *_ = st.magnitude_thresholds(_read(tvs), n, [n // 2, n, n], SMALL_BLOCK)
    assert t == 0.0 and need > 0
    ref = _reference_ties(tvs, 0.5, w, **kw)
    assert torch.equal(_chunked(tvs, chunk, density=0.5, weights=w, **kw), torch.as_tensor(ref))
    assert torch.equal(ops.ties(tvs, 0.5, w, **kw), torch.as_tensor(ref))


@pytest.mark.parametrize("chunk", [SMALL_BLOCK, 3 * SMALL_BLOCK])
def test_ties_with_non_finite_task_vectors_drops_nan_as_before(chunk, threshold_path):
    g = torch.Generator().manual_seed(4)
    n = 30 * SMALL_BLOCK
    tvs = [(0.01 * torch.randn(n, generator=g)).half().float() for _ in range(3)]
    tvs[0][[3, 400, 5000]] = float("nan")
    tvs[1][[10, 600]] = torch.tensor([float("inf"), -float("inf")])
    w = [0.5, 0.3, 0.2]
    ref = torch.as_tensor(_reference_ties(tvs, 0.4, w))
    got = _chunked(tvs, chunk, density=0.4, weights=w)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ops.ties(tvs, 0.4, w), ref, rtol=0, atol=0, equal_nan=True)
    assert not got[[3, 400, 5000]].isnan().any()  # a NaN is never kept by the trim


def test_thresholds_exact_over_all_binades(threshold_path):
    """Zeros, denormals, normal values of every exponent and the largest finite float: the two-pass radix
    select is the kthvalue, whatever the bin."""
    g = torch.Generator().manual_seed(5)
    n = 64 * SMALL_BLOCK
    mant = torch.rand(n, generator=g) + 1.0
    expo = torch.randint(-149, 128, (n,), generator=g).to(torch.float64)
    x = (mant.double() * torch.pow(2.0, expo)).clamp(max=torch.finfo(torch.float32).max).float()
    x[torch.randperm(n, generator=g)[: n // 10]] = 0.0
    x[:5] = torch.finfo(torch.float32).max
    x[5:9] = torch.tensor([1e-45, 2e-45, 1e-40, 1.17e-38])  # denormals around the first normal binade
    x = x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    a = x.abs()
    for k in (1, 3, 7, 100, n // 3, n - n // 10, n - n // 10 + 1, n - 1):
        (t, need), = st.magnitude_thresholds(_read([x]), n, [k], 2 * SMALL_BLOCK)
        kth = torch.kthvalue(a, n - k + 1).values.item()
        assert t == kth and need == k - int((a > kth).sum())


def _fp16_like(n, seed, models=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).half().float()
    return [(base + 0.01 * torch.randn(n, generator=g)).half().float() - base for _ in range(models)]


def test_sampled_window_finds_the_exact_thresholds(monkeypatch):
    monkeypatch.setattr(st, "_SAMPLE_FROM", 0)
    found = []
    window = st._sample_window
    monkeypatch.setattr(st, "_sample_window", lambda *a: found.append(window(*a)) or found[-1])
    n = 1 << 16
    tvs = _fp16_like(n, seed=6)
    tvs[2][: n // 3] = 0.0
    ks = [1, 700, n // 2, n - n // 5, n - 1]
    for k in ks:
        got = st.magnitude_thresholds(_read(tvs), n, [k] * 3, 4 * SMALL_BLOCK)
        for x, (t, need) in zip(tvs, got):
            a = x.abs()
            kth = torch.kthvalue(a, n - k + 1).values.item()
            assert t == kth and need == k - int((a > kth).sum())
    assert any(w is not None for w in found)  # windows were used (and checked exact above)


@pytest.mark.parametrize("window", [(0, 1 << 16), (0x7F00 << 16, 1 << 16), None])
def test_a_sample_window_that_misses_falls_back_to_the_exact_select(monkeypatch, window):
    monkeypatch.setattr(st, "_SAMPLE_FROM", 0)
    monkeypatch.setattr(st, "_sample_window", lambda *a: window)
    n = 40 * SMALL_BLOCK
    tvs = _fp16_like(n, seed=7)
    w = [0.5, 0.3, 0.2]
    kw = {"weighted_sign": True, "divisor": "weight_sum", "keep_count": "floor"}
    ref = torch.as_tensor(_reference_ties(tvs, 0.5, w, **kw))
    kc = kw.pop("keep_count")
    assert torch.equal(_chunked(tvs, 3 * SMALL_BLOCK, density=0.5, weights=w, keep_count_mode=kc, **kw), ref)
