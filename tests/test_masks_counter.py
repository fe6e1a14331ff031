"""Counter-based random masks (DARE, DELLA): the keyed 32-bit hash against pure-Python and numpy uint32
references, indices past 2³², independence of chunking, shape and buffers, keep-rate statistics,
independence across seeds/models, signed zeros, dtype independence, and CPU/GPU bit-identity when CUDA is
there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_merging import ops
from llm_merging.ops import masks as mk
from llm_merging.ops._common import CounterScratch, counter_bits, counter_chunks, counter_hash, counter_key

M64, M32 = (1 << 64) - 1, (1 << 32) - 1


def splitmix_stream(seed: int, n: int) -> list[int]:
    """Vigna's splitmix64.c: the first ``n`` outputs for ``seed``."""
    out, x = [], seed & M64
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def splitmix_at(seed: int, k: int) -> int:
    """Output ``k`` (1-based) of :func:`splitmix_stream` without running the stream (the state after k
    steps is seed + k·φ)."""
    x = (seed + k * 0x9E3779B97F4A7C15) & M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def ref_hash(seed: int, index: int) -> int:
    """Pure-Python reference of the generator: lowbias32(lowbias32((index + k1) mod 2³²) ^ k2), (k1, k2) the
    low/high halves of SplitMix64 output ``index // 2³² + 1`` of the seed."""
    key = splitmix_at(seed, (index >> 32) + 1)
    return ref_lowbias32(ref_lowbias32(((index & M32) + (key & M32)) & M32) ^ (key >> 32))


def ref_bits(seed: int, index: int, bits: int = 24) -> int:
    return ref_hash(seed, index) >> (32 - bits)


def numpy_hash(seed: int, idx: np.ndarray) -> np.ndarray:
    """The same hash in numpy uint32 arithmetic (logical shifts, wrapping multiplies), block 0 only."""
    key = splitmix_stream(seed, 1)[0]
    with np.errstate(over="ignore"):
        x = idx.astype(np.uint32) + np.uint32(key & M32)
        for k in (None, np.uint32(key >> 32)):
            if k is not None:
                x ^= k
            x ^= x >> np.uint32(16)
            x *= np.uint32(0x7FEB352D)
            x ^= x >> np.uint32(15)
            x *= np.uint32(0x846CA68B)
            x ^= x >> np.uint32(16)
    return x


SEEDS = [0, 1, 7, 2**31 - 1, 2**62 + 12345, 2**63 - 1, ops.derive_seed(123, 2)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start", [0, 1000, 2**31 - 100, 2**32 - 150, 2**33 + 17, 2**63])
def test_counter_bits_match_python_reference(seed, start):
    assert [counter_hash(seed, start + i) for i in range(300)] == [ref_hash(seed, start + i) for i in range(300)]
    got = counter_bits(seed, start, 300, "cpu").tolist()
    assert got == [ref_bits(seed, start + i) for i in range(300)]
    got31 = counter_bits(seed, start, 300, "cpu", bits=31).tolist()
    assert got31 == [ref_bits(seed, start + i, 31) for i in range(300)]
    # the whole 32-bit hash through counter_chunks (int32 bit patterns), chunks of 7
    whole = [v & M32 for _, _, b in counter_chunks(seed, 300, "cpu", 32, chunk=7, start=start) for v in b.tolist()]
    assert whole == [ref_hash(seed, start + i) for i in range(300)]


def test_counter_hash_matches_numpy_uint32():
    idx = np.arange(1 << 16, dtype=np.int64)
    for seed in (0, 99, ops.derive_seed(5, 2)):
        ref = numpy_hash(seed, idx)
        got = counter_bits(seed, 0, idx.size, "cpu", bits=31).numpy()
        np.testing.assert_array_equal(got, (ref >> np.uint32(1)).astype(np.int32))
        assert [counter_hash(seed, int(i)) for i in idx[::4099]] == ref[::4099].tolist()


def test_counter_key_is_splitmix64():
    # Known SplitMix64 outputs for seed 1234567 (Vigna's reference splitmix64.c)
    assert splitmix_stream(1234567, 2) == [6457827717110365317, 3203168211198807973]
    assert [counter_key(1234567, b) for b in range(2)] == [6457827717110365317, 3203168211198807973]
    assert [splitmix_at(99, k) for k in range(1, 6)] == splitmix_stream(99, 5)
    assert counter_key(-1) == counter_key(M64) == splitmix_stream(M64, 1)[0]


def test_counter_chunks_straddle_two_to_the_32():
    # a chunk never straddles a multiple of 2³² (the next block has its own key), and the bits are the same
    # however the range is cut
    start = 2**32 - 1000
    spans = [(lo, hi) for lo, hi, _ in counter_chunks(3, 3000, "cpu", chunk=512, start=start)]
    assert spans[0] == (start, start + 512) and (2**32 - 488, 2**32) in spans and (2**32, 2**32 + 512) in spans
    assert torch.equal(counter_bits(3, start, 3000, "cpu"),
                       torch.cat([counter_bits(3, start, 1000, "cpu"), counter_bits(3, 2**32, 2000, "cpu")]))
    # the first entries of block 1 are not block 0's again
    assert not torch.equal(counter_bits(3, 0, 1000, "cpu"), counter_bits(3, 2**32, 1000, "cpu"))


def test_counter_argument_errors():
    for bits in (0, 32, 53):
        with pytest.raises(ValueError, match="bits"):
            counter_bits(1, 0, 10, "cpu", bits=bits)
    with pytest.raises(ValueError, match="start"):
        list(counter_chunks(1, 10, "cpu", start=-1))
    with pytest.raises(ValueError, match="chunk"):
        CounterScratch("cpu", 0)
    assert counter_bits(1, 5, 0, "cpu").shape == (0,) and list(counter_chunks(1, 0, "cpu")) == []


def test_random_mask_matches_reference_uniforms():
    seed, d = ops.derive_seed(5, 1), 0.37
    mask = ops.random_mask((20, 15), d, seed).reshape(-1).tolist()
    assert mask == [ref_bits(seed, i) / 2**24 < d for i in range(300)]


def test_della_mask_matches_reference_uniforms():
    x = torch.randn(12, 25, generator=torch.Generator().manual_seed(0))
    seed = ops.derive_seed(9, 0)
    mask, keep = ops.della_mask(x, 0.6, 0.2, seed)
    u = np.array([ref_bits(seed, i) / 2**24 for i in range(x.numel())], dtype=np.float32)
    np.testing.assert_array_equal(mask.numpy().reshape(-1), u < keep.numpy().reshape(-1))


@pytest.mark.parametrize("chunk", [1, 7, 64, 299, 300, 1 << 24])
def test_same_mask_whatever_chunk_and_shape(chunk):
    seed = 424242
    ref = ops.random_mask((300,), 0.5, seed)
    for shape in [(300,), (20, 15), (15, 20), (3, 10, 10), (300, 1)]:
        m = ops.random_mask(shape, 0.5, seed, chunk=chunk)
        assert m.shape == torch.Size(shape)
        assert torch.equal(m.reshape(-1), ref)
    x = torch.randn(20, 15, generator=torch.Generator().manual_seed(1))
    a, _ = ops.della_mask(x, 0.5, 0.1, seed)
    b, _ = ops.della_mask(x, 0.5, 0.1, seed, chunk=chunk)
    assert torch.equal(a, b)
    # a prefix of a longer stream: entry i depends on (seed, i) only
    assert torch.equal(ops.random_mask((1000,), 0.5, seed, chunk=chunk)[:300], ref)


def test_dare_drop_equals_masking_through_any_chunks_and_offsets():
    # the fused keep-word path (chunked merges) = random_mask + apply_mask (whole tensor), bit for bit,
    # whatever the piece boundaries, with one scratch reused across calls
    x = torch.randn(5000, generator=torch.Generator().manual_seed(7))
    seed, d = ops.derive_seed(31, 2), 0.35
    mask = ops.random_mask(x.shape, d, seed)
    for rescale in ("inverse", None):
        ref = ops.apply_mask(x, mask, rescale, d)
        assert torch.equal(ref.view(torch.int32), torch.where(mask, x / d if rescale else x, 0.0).view(torch.int32))
        for cut, chunk in ((5000, None), (1000, 64), (777, 1 << 18), (1, 3)):
            sc = CounterScratch("cpu", chunk)
            got = x.clone()
            for lo in range(0, 5000, cut):
                mk.dare_drop_(got[lo : lo + cut], d, seed, start=lo, inverse=rescale == "inverse", scratch=sc)
            assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    with pytest.raises(ValueError, match="float32"):
        mk.dare_drop_(x.double(), d, seed)


def test_dropped_entries_are_positive_zero_and_kept_bits_exact():
    # torch.where semantics: dropped → +0.0 (also for negative, -0.0, inf and NaN entries), kept → exact bits
    x = torch.tensor([-1.5, -0.0, 0.0, float("-inf"), float("nan"), 3.0, -2.0**-140] * 300)
    seed, d = 8, 0.5
    mask = ops.random_mask(x.shape, d, seed)
    assert 0 < int(mask.sum()) < x.numel()
    for rescale, keep in (("inverse", d), (None, None), ("inverse", torch.full(x.shape, 0.25))):
        want = torch.where(mask, x / keep if rescale else x, 0.0).view(torch.int32)
        assert torch.equal(ops.apply_mask(x, mask, rescale, keep).view(torch.int32), want)
    for chunk in (7, 1000, None):
        got = mk.zero_dropped_(x.clone(), mask, chunk)
        assert torch.equal(got.view(torch.int32), torch.where(mask, x, 0.0).view(torch.int32))
    with pytest.raises(ValueError, match="entries"):
        mk.zero_dropped_(x.clone(), mask[:-1])
    got = mk.dare_drop_(x.clone(), d, seed)
    assert torch.equal(got.view(torch.int32), torch.where(mask, x / d, 0.0).view(torch.int32))
    assert (got.view(torch.int32)[~mask] == 0).all()  # +0.0, never -0.0


def test_keep_rate_a_million_entries_and_every_bit_balanced():
    n, d = 1 << 20, 0.3
    kept = int(ops.random_mask((n,), d, 2024).sum())
    assert abs(kept - n * d) < 5 * math.sqrt(n * d * (1 - d))
    b = counter_bits(2024, 0, n, "cpu", bits=31)
    sd = math.sqrt(n * 0.25)
    for k in range(31):
        ones = int(b.bitwise_right_shift(k).bitwise_and_(1).sum())
        assert abs(ones - n / 2) < 5 * sd, k


def test_masks_of_models_and_seeds_are_independent():
    n, p = 1 << 20, 0.5
    sd = math.sqrt(p * p * (1 - p * p) / n)
    masks = [ops.random_mask((n,), p, ops.derive_seed(s, i)) for s, i in ((7, 0), (7, 1), (7, 2), (8, 0), (6, 1))]
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            both = (masks[a] & masks[b]).float().mean().item()
            assert abs(both - p * p) < 5 * sd, (a, b)
    # neighbouring raw seeds too, at another density
    a, b = ops.random_mask((n,), 0.2, 100), ops.random_mask((n,), 0.2, 101)
    assert abs((a & b).float().mean().item() - 0.04) < 5 * math.sqrt(0.04 * 0.96 / n)
    # adjacent entries of one stream are uncorrelated (uniforms in [0, 1), correlation ≈ 0 ± 5/√n)
    u = counter_bits(7, 0, n, "cpu").double() / 2**24
    for lag in (1, 2, 1024):
        r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n), lag


def test_streams_are_not_shifted_copies():
    # two seeds whose first keys differ by δ feed the first round the same counters at offset δ: the second
    # key must still make their outputs unrelated
    n = 1 << 16
    ka, kb = counter_key(11) & M32, counter_key(12) & M32
    delta = (kb - ka) & M32  # index i of seed 12 and index i + δ of seed 11 share (i + k1) mod 2³²
    a = counter_bits(11, delta, n, "cpu").double() / 2**24
    b = counter_bits(12, 0, n, "cpu").double() / 2**24
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(n)
    assert abs(((a < 0.5) & (b < 0.5)).double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 3, ops.derive_seed(77, 4)])
def test_keep_rate_binomial_bounds(density, seed):
    n = 200_000
    kept = int(ops.random_mask((400, 500), density, seed).sum())
    sd = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sd


def test_keep_rate_uniform_over_positions_and_seeds():
    # no structure by position: first and second halves, even and odd indices keep at the same rate
    m = ops.random_mask((1 << 18,), 0.25, 11).float()
    sd = math.sqrt(0.25 * 0.75 / (1 << 17))
    for part in (m[: 1 << 17], m[1 << 17 :], m[0::2], m[1::2]):
        assert abs(part.mean().item() - 0.25) < 5 * sd
    # masks of neighbouring seeds are independent: agreement rate 0.25² + 0.75²
    a, b = ops.random_mask((1 << 18,), 0.25, 11), ops.random_mask((1 << 18,), 0.25, 12)
    agree = (a == b).float().mean().item()
    assert abs(agree - 0.625) < 5 * math.sqrt(0.625 * 0.375 / (1 << 18))


def test_della_keep_rate_follows_probabilities():
    x = torch.randn(100, 2000, generator=torch.Generator().manual_seed(2))
    mask, keep = ops.della_mask(x, 0.5, 0.4, seed=8)
    n = x.numel()
    expected = float(keep.sum(dtype=torch.float64))
    sd = math.sqrt(float((keep.double() * (1 - keep.double())).sum()))
    assert abs(int(mask.sum()) - expected) < 5 * sd
    top = keep > 0.8  # the largest magnitudes: keep probability in (0.8, 0.9]
    assert mask[top].float().mean() > 0.8 and mask[keep < 0.2].float().mean() < 0.2
    assert n == mask.numel()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_della_mask_independent_of_input_dtype(dtype):
    x = torch.randn(30, 40, generator=torch.Generator().manual_seed(3))
    x = x.to(dtype).to(torch.float32)  # values representable in every dtype: same ranks
    ref, keep_ref = ops.della_mask(x, 0.7, 0.1, seed=5)
    got, keep = ops.della_mask(x.to(dtype), 0.7, 0.1, seed=5)
    assert torch.equal(got, ref) and torch.equal(keep, keep_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dare_independent_of_input_dtype(dtype):
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(16, 16, generator=g).to(dtype).to(torch.float32) for _ in range(2)]
    ref = ops.dare(ts, 0.4, seed=6)
    got = ops.dare([t.to(dtype) for t in ts], 0.4, seed=6)
    assert torch.equal(got, ref)


def test_seed_rules():
    assert torch.equal(ops.random_mask((50, 50), 0.5, 5), ops.random_mask((50, 50), 0.5, 5))
    assert not torch.equal(ops.random_mask((50, 50), 0.5, 5), ops.random_mask((50, 50), 0.5, 6))
    # negative and > 63-bit seeds are taken modulo 2⁶⁴
    assert torch.equal(ops.random_mask((64,), 0.5, -1), ops.random_mask((64,), 0.5, 2**64 - 1))
    assert ops.random_mask((0,), 0.5, 1).shape == (0,)
    assert ops.random_mask((3, 4), 1.0, 1).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_bit_identical():
    for seed in SEEDS:
        for start in (0, 2**32 - 2000, 2**33):
            gpu_bits = counter_bits(seed, start, 5000, "cuda", bits=31).cpu()
            assert torch.equal(gpu_bits, counter_bits(seed, start, 5000, "cpu", bits=31))
        gpu_mask = ops.random_mask((123, 457), 0.3, seed, "cuda", chunk=1000).cpu()
        assert torch.equal(gpu_mask, ops.random_mask((123, 457), 0.3, seed))
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    a, ka = ops.della_mask(x, 0.6, 0.3, seed=9)
    b, kb = ops.della_mask(x.cuda(), 0.6, 0.3, seed=9)
    assert torch.equal(a, b.cpu()) and torch.equal(ka, kb.cpu())
    ts = [torch.randn(40, 50, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cpu, gpu = ops.dare(ts, 0.3, seed=2), ops.dare([t.cuda() for t in ts], 0.3, seed=2).cpu()
    # the fused keep-word path on the GPU keeps the same entries
    xg = ts[0].cuda().reshape(-1).clone()
    assert torch.equal(mk.dare_drop_(xg, 0.3, 4, inverse=False).cpu(),
                       mk.dare_drop_(ts[0].reshape(-1).clone(), 0.3, 4, inverse=False))
    assert torch.equal(cpu, gpu)  # 1/p is a true division on both (masks._divisor), so the same bits
