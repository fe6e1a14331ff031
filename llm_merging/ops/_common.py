"""Shared validation and numerical helpers for :mod:`llm_merging.ops` (private)."""
from __future__ import annotations

import math
import numbers
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError

#: A hyperparameter given once for all models or once per model.
PerModel = Union[float, Sequence[float]]

_MASK64 = (1 << 64) - 1


def per_matrix(fn, tensors: Sequence[Tensor], *args, **kwargs) -> Tensor:
    """``fn(tensors, *args, **kwargs)`` on each matrix of 3-D inputs, stacked: a stack of matrices (E, m, n),
    such as the fused experts of a mixture-of-experts layer, merged as E matrices of its own, each with its
    own spectrum (not as one flattened tensor)."""
    ts = list(tensors)
    return torch.stack([fn([t[e] for t in ts], *args, **kwargs) for e in range(ts[0].shape[0])])


def check_tensors(tensors: Sequence[Tensor], name: str = "task_vectors", min_count: int = 1) -> list[Tensor]:
    """Return ``tensors`` as a list after checking count, type, shape and device."""
    if isinstance(tensors, Tensor):
        raise ConfigError(f"{name}: expected a sequence of tensors, got a single tensor")
    try:
        items = list(tensors)
    except TypeError:
        raise ConfigError(f"{name}: expected a sequence of tensors, got {type(tensors).__name__}") from None
    if len(items) < min_count:
        raise ConfigError(f"{name}: expected at least {min_count} tensor(s), got {len(items)}")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise ConfigError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise ConfigError(f"{name}[{i}]: complex tensors are not supported")
    shape, device = items[0].shape, items[0].device
    for i, t in enumerate(items[1:], start=1):
        if t.shape != shape:
            raise ConfigError(
                f"{name}[{i}]: shape {tuple(t.shape)} does not match {name}[0] shape {tuple(shape)}"
            )
        if t.device != device:
            raise ConfigError(f"{name}[{i}]: device {t.device} does not match {name}[0] device {device}")
    return items


def check_pair(a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    """Check that two tensors have the same shape and device."""
    for n, t in zip(names, (a, b)):
        if not isinstance(t, Tensor):
            raise ConfigError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
    if a.shape != b.shape:
        raise ConfigError(f"{names[1]}: shape {tuple(b.shape)} does not match {names[0]} shape {tuple(a.shape)}")
    if a.device != b.device:
        raise ConfigError(f"{names[1]}: device {b.device} does not match {names[0]} device {a.device}")


def f32(t: Tensor) -> Tensor:
    """A float32 view or copy of ``t`` (never modified by the caller's code paths)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def stack_f32(tensors: Sequence[Tensor]) -> Tensor:
    """Stack into one new float32 tensor ``(N, *shape)`` with a single allocation."""
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float32, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i].copy_(t)
    return out


def weighted_sum_f32(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ wᵢ xᵢ`` in float32, accumulated in place: one output tensor, no stacked copy of the inputs."""
    out = torch.mul(tensors[0].to(torch.float32), float(weights[0]))
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t.to(torch.float32), alpha=float(w))
    return out


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_real(value: object, name: str) -> float:
    """A finite real number."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def check_range(
    value: object,
    name: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite number inside the interval (brackets as given by ``*_open``)."""
    v = check_real(value, name)
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name}: {v!r} is outside {interval}")
    return v


def per_model(
    value: PerModel,
    n: int,
    name: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> list[float]:
    """Expand a scalar or a per-model sequence into ``n`` checked floats."""
    if isinstance(value, Tensor):
        value = value.tolist() if value.dim() > 0 else value.item()
    if isinstance(value, (str, bytes)):
        raise ConfigError(f"{name}: expected a number or one number per model, got {value!r}")
    if isinstance(value, Sequence):
        values = list(value)
        if len(values) != n:
            raise ConfigError(f"{name}: expected one value per model ({n}), got {len(values)}")
        return [
            check_range(v, f"{name}[{i}]", low, high, low_open=low_open, high_open=high_open)
            for i, v in enumerate(values)
        ]
    v = check_range(value, name, low, high, low_open=low_open, high_open=high_open)
    return [v] * n


def weight_list(weights: Optional[PerModel], n: int, name: str = "weights") -> list[float]:
    """Per-model weights (default all 1.0); any finite real numbers."""
    if weights is None:
        return [1.0] * n
    return per_model(weights, n, name)


def weight_tensor(weights: Sequence[float], like: Tensor) -> Tensor:
    """Weights as a float32 tensor shaped ``(N, 1, ..., 1)`` to broadcast against ``like`` ``(N, *shape)``."""
    w = torch.tensor(weights, dtype=torch.float32, device=like.device)
    return w.view(-1, *([1] * (like.dim() - 1)))


def check_choice(value: object, name: str, choices: Sequence[object]) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{name}: {value!r} is not one of {shown}")
    return value


def check_seed(seed: object, name: str = "seed") -> int:
    """An integer seed (Python int or integral number, not bool)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"{name}: expected an integer, got {seed!r}")
    return int(seed)


def derive_seed(seed: int, index: int) -> int:
    """Seed of stream ``index`` derived from ``seed`` with the SplitMix64 finaliser (pure Python).

    Distinct, well-mixed, non-negative 63-bit seeds: model ``i`` of tensor seed ``s`` never
    shares a stream with model ``i+1`` of tensor seed ``s-1`` (as plain ``seed + i`` would).
    """
    z = ((seed & _MASK64) + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & ((1 << 63) - 1)


_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64 increment
_MASK32 = (1 << 32) - 1
#: the two multipliers of the lowbias32 mixer (Wellons, "hash-prospector")
_LB1, _LB2 = 0x7FEB352D, 0x846CA68B
#: flat indices hashed per step by :func:`counter_chunks` on CPU (two reused 2 MiB int32 buffers: cache
#: sized, and few enough op calls per entry; measured best of 2¹⁷–2²⁰ at 1–2 threads) and on other devices
#: (few kernel launches per tensor)
COUNTER_CHUNK_CPU = 1 << 19
COUNTER_CHUNK_DEVICE = 1 << 24
#: flat indices share one key pair within a block of this many (the counter is the index's low 32 bits)
COUNTER_BLOCK = 1 << 32


def _signed32(v: int) -> int:
    """``v mod 2**32`` as a signed int32 value (what a torch int32 tensor holds for those bits)."""
    v &= _MASK32
    return v - (1 << 32) if v >> 31 else v


def fmix64(z: int) -> int:
    """The SplitMix64 finaliser of a 64-bit value (pure Python, unsigned)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def lowbias32(x: int) -> int:
    """The lowbias32 32-bit mixer (pure Python, unsigned): xorshift 16, ×0x7feb352d, xorshift 15,
    ×0x846ca68b, xorshift 16, all modulo 2³²."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _LB1) & _MASK32
    x ^= x >> 15
    x = (x * _LB2) & _MASK32
    return x ^ (x >> 16)


def counter_key(seed: int, block: int = 0) -> int:
    """The 64-bit key of ``seed`` for flat indices ``block·2³² … (block + 1)·2³² − 1``: output ``block + 1``
    of SplitMix64 seeded with ``seed`` (mod 2⁶⁴), i.e. ``fmix64(seed + (block + 1)·φ)``."""
    return fmix64((seed & _MASK64) + (block + 1) * _GOLDEN)


def counter_hash(seed: int, index: int) -> int:
    """Pure-Python reference of the counter-based generator: the unsigned 32-bit hash of flat ``index``
    under ``seed``, ``lowbias32(lowbias32((index + k₁) mod 2³²) ⊕ k₂)`` with ``k₁``/``k₂`` the low/high
    halves of :func:`counter_key` ``(seed, index // 2³²)``. :func:`counter_bits` is its top bits."""
    key = counter_key(seed, index >> 32)
    return lowbias32(lowbias32((index & _MASK32) + (key & _MASK32)) ^ (key >> 32))


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 31:
        raise ValueError(f"bits: {bits!r} is outside [1, 31]")


def _xorshift_(z: Tensor, t: Tensor, shift: int) -> None:
    """``z ^= z >>> shift`` in place on int32 ``z`` (logical shift: arithmetic shift, then the
    sign-extended bits masked off; ``t`` scratch of the same size)."""
    torch.bitwise_right_shift(z, shift, out=t)
    t.bitwise_and_((1 << (32 - shift)) - 1)
    z.bitwise_xor_(t)


def _lowbias32_(z: Tensor, t: Tensor) -> None:
    """:func:`lowbias32` in place on the bit patterns of int32 ``z`` (multiplication wraps modulo 2³²
    on every backend)."""
    _xorshift_(z, t, 16)
    z.mul_(_signed32(_LB1))
    _xorshift_(z, t, 15)
    z.mul_(_signed32(_LB2))
    _xorshift_(z, t, 16)


class CounterScratch:
    """Reusable int32 buffers (``chunk`` entries each) for :func:`counter_chunks` on one device: pass one
    to successive calls (e.g. one per chunk of a chunked merge) so no call allocates. ``chunk``: entries per
    hash step (default :data:`COUNTER_CHUNK_CPU` on CPU, :data:`COUNTER_CHUNK_DEVICE` elsewhere)."""

    def __init__(self, device: Union[str, torch.device, None] = None, chunk: Optional[int] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if chunk is None:
            chunk = COUNTER_CHUNK_CPU if self.device.type == "cpu" else COUNTER_CHUNK_DEVICE
        if int(chunk) < 1:
            raise ValueError(f"chunk: {chunk!r} is not a positive number of entries")
        self.chunk = int(chunk)
        self._bufs: Optional[tuple[Tensor, Tensor, Tensor]] = None

    def buffers(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(offsets 0 … step − 1, z, t)`` int32 for steps of ``step = min(chunk, n)`` entries (grown on
        demand, never shrunk)."""
        step = max(1, min(self.chunk, n))
        if self._bufs is None or self._bufs[0].numel() < step:
            base = torch.arange(step, dtype=torch.int32, device=self.device)
            self._bufs = (base, torch.empty_like(base), torch.empty_like(base))
        return self._bufs


def counter_chunks(
    seed: int,
    n: int,
    device: Union[str, torch.device, None],
    bits: int = 24,
    chunk: Optional[int] = None,
    *,
    start: int = 0,
    scratch: Optional[CounterScratch] = None,
) -> Iterator[tuple[int, int, Tensor]]:
    """``(lo, hi, b)`` for consecutive chunks of the flat indices ``start … start + n − 1``: ``b`` (int32)
    holds the top ``bits`` bits of :func:`counter_hash` ``(seed, i)`` for ``i = lo … hi − 1``, in a buffer
    reused by the next chunk (consume it before advancing). ``bits=32`` is the whole hash as int32 bit
    patterns (negative where the top bit is set). ``chunk``: entries per step (default by device; ignored
    when ``scratch`` is given, whose buffers are used instead); the bits depend on neither. A chunk never
    straddles a multiple of 2³²: each such block of indices has its own key, so the 32-bit counter never
    wraps onto an earlier block's stream (any index below 2⁶⁴ is served).
    """
    if bits != 32:
        _check_bits(bits)
    if n <= 0:
        return
    if start < 0:
        raise ValueError(f"start: {start!r} is negative")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if scratch is None:
        scratch = CounterScratch(device, chunk)
    elif scratch.device != device:
        raise ValueError(f"scratch: buffers on {scratch.device}, not {device}")
    base, z, t = scratch.buffers(n)
    step = base.numel()
    lo, stop, key_block = start, start + n, None
    while lo < stop:
        block, off = lo >> 32, lo & _MASK32
        count = min(step, stop - lo, COUNTER_BLOCK - off)
        if block != key_block:
            key_block, key = block, counter_key(seed, block)
            k1, k2 = key & _MASK32, _signed32(key >> 32)
        zc, tc = z[:count], t[:count]
        torch.add(base[:count], _signed32(off + k1), out=zc)  # the counter (index + k₁) mod 2³²
        _lowbias32_(zc, tc)
        zc.bitwise_xor_(k2)
        _lowbias32_(zc, tc)
        if bits < 32:
            zc.bitwise_right_shift_(32 - bits).bitwise_and_((1 << bits) - 1)
        yield lo, lo + count, zc
        lo += count


def counter_bits(
    seed: int, start: int, count: int, device: Union[str, torch.device, None], bits: int = 24
) -> Tensor:
    """Counter-based random bits: the top ``bits`` (1–31) bits of :func:`counter_hash` ``(seed, i)`` for
    the flat indices ``i = start … start + count − 1``, as a new int32 tensor on ``device``.

    A pure function of (seed, i) computed on the device in int32 arithmetic (wrapping multiply, xor, add,
    arithmetic shift and mask), so every device, chunking and tensor shape gives the same bits for the same
    (seed, flat index); for a whole tensor use :func:`counter_chunks` (reused buffers, no output tensor).
    """
    _check_bits(bits)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(max(count, 0), dtype=torch.int32, device=device)
    for lo, hi, b in counter_chunks(seed, count, device, bits, start=start):
        out[lo - start : hi - start].copy_(b)
    return out


KEEP_COUNTS = ("round", "floor")


def keep_count(density: float, n: int, mode: str = "round", *, at_least_one: bool = True) -> int:
    """Number of entries a density keeps out of ``n``.

    ``mode="round"`` (ours): k = round(density·n), half up. ``mode="floor"`` (mergekit 0.1.5 and PEFT):
    k = int(density·n), truncated. Either way at least 1 when density > 0 (unless ``at_least_one=False``:
    mergekit's ``magnitude_outliers`` keeps ``int(density·n)`` even when that is 0), all when density ≥ 1.
    """
    check_choice(mode, "keep_count", KEEP_COUNTS)
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    k = int(math.floor(density * n + 0.5)) if mode == "round" else int(density * n)
    return min(n, max(1, k) if at_least_one else k)


def dot64(x: Tensor, y: Tensor, chunk: int = 1 << 22) -> float:
    """Dot product of two same-shape tensors, accumulated in float64 chunk by chunk (low memory)."""
    xf, yf = x.reshape(-1), y.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, xf.numel(), chunk):
        xs = xf[start : start + chunk].to(torch.float64)
        ys = xs if y is x else yf[start : start + chunk].to(torch.float64)
        total += torch.dot(xs, ys)
    return float(total)


def norm64(x: Tensor) -> float:
    """Euclidean norm of a tensor, accumulated in float64."""
    return math.sqrt(max(dot64(x, x), 0.0))


def polar(x: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ`` (thin SVD): the closest matrix with orthonormal
    columns (or rows, when ``x`` is wide)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh
