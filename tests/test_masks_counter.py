"""Counter-based random masks (DARE, DELLA): the hash against a pure-Python reference, independence of
chunking and shape, keep-rate statistics, dtype independence, and CPU/GPU bit-identity when CUDA is there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_merging import ops
from llm_merging.ops._common import counter_bits

M64 = (1 << 64) - 1


def ref_splitmix_bits(seed: int, index: int, bits: int = 24) -> int:
    """Pure-Python reference of the generator: top ``bits`` bits of SplitMix64's finaliser applied to
    ``key + (index + 1)·φ``, where ``key`` is the first SplitMix64 output of ``seed``."""

    def fmix(z: int) -> int:
        z &= M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    phi = 0x9E3779B97F4A7C15
    key = fmix((seed & M64) + phi)
    return fmix(key + (index + 1) * phi) >> (64 - bits)


SEEDS = [0, 1, 7, 2**31 - 1, 2**62 + 12345, 2**63 - 1, ops.derive_seed(123, 2)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("start", [0, 1000, 2**33 + 17])
def test_counter_bits_match_python_reference(seed, start):
    got = counter_bits(seed, start, 300, "cpu").tolist()
    assert got == [ref_splitmix_bits(seed, start + i) for i in range(300)]
    got53 = counter_bits(seed, start, 200, "cpu", bits=53).tolist()
    assert got53 == [ref_splitmix_bits(seed, start + i, 53) for i in range(200)]


def test_splitmix_reference_is_splitmix64():
    # Known SplitMix64 outputs for seed 1234567 (Vigna's reference splitmix64.c): our reference's stream
    # for a seed s is SplitMix64 seeded with its first output, i.e. outputs 2, 3, … of seed s.
    def splitmix_stream(seed, n):
        out, x = [], seed
        for _ in range(n):
            x = (x + 0x9E3779B97F4A7C15) & M64
            z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            out.append(z ^ (z >> 31))
        return out

    assert splitmix_stream(1234567, 2) == [6457827717110365317, 3203168211198807973]
    key = splitmix_stream(99, 1)[0]
    assert [ref_splitmix_bits(99, i, 64) for i in range(5)] == splitmix_stream(key, 5)


def test_random_mask_matches_reference_uniforms():
    seed, d = ops.derive_seed(5, 1), 0.37
    mask = ops.random_mask((20, 15), d, seed).reshape(-1).tolist()
    assert mask == [ref_splitmix_bits(seed, i) / 2**24 < d for i in range(300)]


def test_della_mask_matches_reference_uniforms():
    x = torch.randn(12, 25, generator=torch.Generator().manual_seed(0))
    seed = ops.derive_seed(9, 0)
    mask, keep = ops.della_mask(x, 0.6, 0.2, seed)
    u = np.array([ref_splitmix_bits(seed, i) / 2**24 for i in range(x.numel())], dtype=np.float32)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_bit_identical():
    for seed in SEEDS:
        gpu_bits = counter_bits(seed, 2**33, 5000, "cuda", bits=63).cpu()
        assert torch.equal(gpu_bits, counter_bits(seed, 2**33, 5000, "cpu", bits=63))
        gpu_mask = ops.random_mask((123, 457), 0.3, seed, "cuda", chunk=1000).cpu()
        assert torch.equal(gpu_mask, ops.random_mask((123, 457), 0.3, seed))
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(5))
    a, ka = ops.della_mask(x, 0.6, 0.3, seed=9)
    b, kb = ops.della_mask(x.cuda(), 0.6, 0.3, seed=9)
    assert torch.equal(a, b.cpu()) and torch.equal(ka, kb.cpu())
    ts = [torch.randn(40, 50, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cpu, gpu = ops.dare(ts, 0.3, seed=2), ops.dare([t.cuda() for t in ts], 0.3, seed=2).cpu()
    assert torch.equal(cpu == 0, gpu == 0) and torch.allclose(cpu, gpu, rtol=1e-6, atol=0)
