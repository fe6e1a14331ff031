"""SVD / subspace merges: TSV-Merge, Iso-C, Iso-CTS, KnOTS.

2-D tensors get the subspace treatment; every other tensor (1-D biases and norms, ≥3-D) falls back to
what the reference code does for non-matrices (see each function). SVDs run in float32 on the inputs'
device (KnOTS's small core in float64); results are float32.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import (
    PerModel,
    check_choice,
    check_range,
    check_real,
    check_seed,
    check_tensors,
    derive_seed,
    dot64,
    f32,
    per_matrix,
    per_model,
    polar,
    stack_f32,
    weight_list,
    weight_tensor,
)
from llm_merging.ops.consensus import DIVISORS, SIGN_METHODS, consensus_merge
from llm_merging.ops.masks import apply_mask, magnitude_mask, random_mask


def _mean(ts: Sequence[Tensor]) -> Tensor:
    return stack_f32(ts).mean(dim=0)


def _sum(ts: Sequence[Tensor]) -> Tensor:
    out = f32(ts[0]).clone()
    for t in ts[1:]:
        out += t
    return out


def tsv(task_vectors: Sequence[Tensor], scale: float = 1.0, *, rank_per_task: Optional[int] = None) -> Tensor:
    """TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging"; reference code ``AntoAndGar/task_singular_vectors``, ``compute_and_sum_svd_mem_reduction``).

    2-D τᵢ (m×n) with T tasks (a 3-D stack of matrices, e.g. fused MoE experts: each matrix on its own): τᵢ = Uᵢ Σᵢ Vᵢᵀ; keep each task's top k = ⌊min(m, n)/T⌋ singular triplets
    (at least 1; ``rank_per_task`` overrides), concatenate U = [U₁ₖ … U_Tₖ], σ = [σ₁ₖ … σ_Tₖ],
    Vᵀ = [V₁ₖᵀ; …; V_Tₖᵀ], decorrelate by replacing U and Vᵀ with their orthogonal polar factors
    (U' = P Qᵀ from the thin SVD U = P S Qᵀ, likewise for Vᵀ), and return ``λ · U' diag(σ) V'ᵀ`` — a sum-like
    merge (one task gives τ back exactly). Other tensors: ``λ · mean(τᵢ)``, as the reference code does.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    if ts[0].dim() == 3:
        return per_matrix(tsv, ts, scale, rank_per_task=rank_per_task)
    if ts[0].dim() != 2:
        return _mean(ts) * lam
    n_tasks = len(ts)
    r = min(ts[0].shape)
    if rank_per_task is None:
        k = max(1, r // n_tasks)
    else:
        if isinstance(rank_per_task, bool) or not isinstance(rank_per_task, int) or rank_per_task < 1:
            raise ConfigError(f"rank_per_task: expected a positive integer, got {rank_per_task!r}")
        k = rank_per_task
    k = min(k, r)
    us, ss, vhs = [], [], []
    for t in ts:
        u, s, vh = torch.linalg.svd(f32(t), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
        del u, s, vh
    u_o = polar(torch.cat(us, dim=1))
    vh_o = polar(torch.cat(vhs, dim=0))
    sig = torch.cat(ss)
    return ((u_o * sig) @ vh_o) * lam


def iso_c(task_vectors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", arXiv:2502.04959; reference code ``danielm1405/iso-merging``).

    2-D: M = Σ τᵢ = U Σ Vᵀ; return ``λ · σ̄ · U Vᵀ`` with σ̄ the mean singular value (flattened spectrum).
    Other tensors: ``λ · mean(τᵢ)`` as the reference code.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    if ts[0].dim() == 3:
        return per_matrix(iso_c, ts, scale)
    if ts[0].dim() != 2:
        return _mean(ts) * lam
    u, s, vh = torch.linalg.svd(_sum(ts), full_matrices=False)
    return (u @ vh) * (s.mean() * lam)


def iso_cts(task_vectors: Sequence[Tensor], common_space_fraction: float = 0.8, scale: float = 1.0) -> Tensor:
    """Iso-CTS (Marczak et al. 2025): isotropic merge in common + task-specific subspaces.

    2-D (m×n, r = min(m, n), T tasks), following the reference ``iso_cts``:
    k_c = ⌊r·fraction⌋; per-task size s = round((r − k_c)/T) (Python rounding, at most ⌊r/T⌋) and then
    k_c = r − T·s. Common subspace: the top-k_c singular triplets of M = Σ τᵢ. Task-specific: for each task
    the top-s triplets of τᵢ − U_c U_cᵀ τᵢ (projected off the common subspace). Concatenate the T·s + k_c
    triplets, replace U and Vᵀ by their orthogonal polar factors and every singular value by their mean σ̄:
    ``λ · σ̄ · U' V'ᵀ``. fraction = 1 gives Iso-C. Other tensors: ``λ · mean(τᵢ)``.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    frac = check_range(common_space_fraction, "common_space_fraction", 0.0, 1.0)
    if ts[0].dim() == 3:
        return per_matrix(iso_cts, ts, common_space_fraction, scale)
    if ts[0].dim() != 2:
        return _mean(ts) * lam
    n_tasks = len(ts)
    r = min(ts[0].shape)
    k_c = int(r * frac)
    per_task = min(round((r - k_c) / n_tasks), r // n_tasks)
    k_c = r - per_task * n_tasks
    u, s, vh = torch.linalg.svd(_sum(ts), full_matrices=False)
    u_c, s_c, vh_c = u[:, :k_c], s[:k_c], vh[:k_c]
    del u, s, vh
    us, ss, vhs = [u_c], [s_c], [vh_c]
    if per_task > 0:
        for t in ts:
            tf = f32(t)
            w_ts = tf - u_c @ (u_c.T @ tf)
            ut, st, vht = torch.linalg.svd(w_ts, full_matrices=False)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
            del ut, st, vht, w_ts
    u_o = polar(torch.cat(us, dim=1))
    vh_o = polar(torch.cat(vhs, dim=0))
    sigma = torch.cat(ss).mean()
    return (u_o @ vh_o) * (sigma * lam)


KNOTS_METHODS = ("ties", "task_arithmetic", "dare_ties", "dare_linear")


def knots(
    lora_factors: Sequence[tuple[Tensor, Tensor]],
    method: str = "ties",
    density: PerModel = 0.2,
    weights: Optional[PerModel] = None,
    scale: float = 1.0,
    *,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
    seed: int = 0,
    rtol: float = 1e-5,
) -> Tensor:
    """KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", arXiv:2410.19735; reference
    code ``gstoica27/KnOTS``, ``SVDMerger`` with ``concat_across_output=True, s_on_V=True``).

    Expert i gives ``(Bᵢ, Aᵢ)`` with ΔWᵢ = Bᵢ Aᵢ (O×I; LoRA scaling folded into B; ranks may differ).
    The updates are concatenated side by side, [ΔW₁ … ΔWₙ] = U Σ [V₁ᵀ … Vₙᵀ] (one SVD, singular values
    ≤ ``rtol``·σ_max dropped), so every task is ΔWᵢ = U (Σ Vᵢᵀ) in the shared basis U. The per-task
    blocks Σ Vᵢᵀ (rank × I) are merged — ``"ties"``: top-``density`` trim per block, sign election,
    disjoint mean (as the reference ``ties`` with ``merging_type="mean"``); ``"task_arithmetic"``:
    Σ wᵢ Σ Vᵢᵀ (then the result is exactly λ Σ wᵢ ΔWᵢ); ``"dare_ties"`` / ``"dare_linear"``: DARE drop
    (keep probability ``density``, 1/p rescale, ``seed``) before the ties / linear step — and the result
    is ``λ · U · merged``.

    Differences from the reference: trimming is per tensor (the reference ranks the entries of all layers
    of a task jointly), ``weights`` are per model (the reference scales every task by its first
    coefficient), and the rank cut-off is relative (reference: σ > 1e-5 absolute).

    The SVD never touches an O × nI matrix: with B = [B₁ … Bₙ] = Q_B R_B and Aᵢᵀ = Q_Aᵢ R_Aᵢ,
    [ΔW₁ … ΔWₙ] = Q_B · (R_B · blockdiag(R_Aᵢᵀ)) · blockdiag(Q_Aᵢ)ᵀ, so one SVD of the small
    (Σrᵢ)×(Σrᵢ) core gives U Σ and every Vᵢ. QR and the core SVD run in float64.
    """
    check_choice(method, "method", KNOTS_METHODS)
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    check_choice(divisor, "divisor", DIVISORS)
    lam = check_real(scale, "scale")
    tol = check_range(rtol, "rtol", 0.0, 1.0)
    s_seed = check_seed(seed)
    if isinstance(lora_factors, (Tensor, str)) or not isinstance(lora_factors, Sequence):
        raise ConfigError("lora_factors: expected a sequence of (B, A) pairs")
    pairs = list(lora_factors)
    if not pairs:
        raise ConfigError("lora_factors: expected at least 1 (B, A) pair, got 0")
    bs, as_ = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ConfigError(f"lora_factors[{i}]: expected a (B, A) pair")
        b, a = pair
        if not isinstance(b, Tensor) or not isinstance(a, Tensor) or b.dim() != 2 or a.dim() != 2:
            raise ConfigError(f"lora_factors[{i}]: B and A must be 2-D tensors")
        if b.shape[1] != a.shape[0]:
            raise ConfigError(
                f"lora_factors[{i}]: B is {tuple(b.shape)} and A is {tuple(a.shape)}; ranks differ"
            )
        bs.append(b)
        as_.append(a)
    out_dim, in_dim = bs[0].shape[0], as_[0].shape[1]
    device = bs[0].device
    for i, (b, a) in enumerate(zip(bs, as_)):
        if b.shape[0] != out_dim or a.shape[1] != in_dim:
            raise ConfigError(
                f"lora_factors[{i}]: B A is {b.shape[0]}x{a.shape[1]}, expected {out_dim}x{in_dim}"
            )
        if b.device != device or a.device != device:
            raise ConfigError(f"lora_factors[{i}]: device differs from lora_factors[0] ({device})")
    n = len(pairs)
    w = weight_list(weights, n)
    if method in ("task_arithmetic",):
        dens = [1.0] * n
    else:
        dens = per_model(density, n, "density", 0.0, 1.0, low_open=True)

    f64 = torch.float64
    q_b, r_b = torch.linalg.qr(torch.cat([b.to(f64) for b in bs], dim=1))  # O×p, p×R
    q_as, r_as_t = [], []
    for a in as_:
        q_a, r_a = torch.linalg.qr(a.to(f64).T)  # I×qᵢ, qᵢ×rᵢ
        q_as.append(q_a)
        r_as_t.append(r_a.T)  # rᵢ×qᵢ
    core = r_b @ torch.block_diag(*r_as_t)  # p × Σqᵢ
    p_mat, sig, zh = torch.linalg.svd(core, full_matrices=False)
    if sig.numel() == 0 or float(sig[0]) == 0.0:
        return torch.zeros((out_dim, in_dim), dtype=torch.float32, device=device)
    keep = sig > tol * sig[0]
    u = q_b @ p_mat[:, keep]  # O × q
    sig, zh = sig[keep], zh[keep]
    blocks = torch.empty((n, sig.numel(), in_dim), dtype=torch.float32, device=device)
    start = 0
    for i, q_a in enumerate(q_as):
        width = q_a.shape[1]
        blocks[i] = (sig[:, None] * zh[:, start : start + width]) @ q_a.T  # Σ Vᵢᵀ
        start += width

    if method in ("ties", "dare_ties", "dare_linear"):
        for i, d in enumerate(dens):
            if d >= 1.0:
                continue
            if method == "ties":
                blocks[i].masked_fill_(~magnitude_mask(blocks[i], d), 0.0)
            else:
                mask = random_mask(blocks[i].shape, d, derive_seed(s_seed, i), device)
                blocks[i] = apply_mask(blocks[i], mask, "inverse", d)
    if method in ("ties", "dare_ties"):
        merged = consensus_merge(blocks, w, sign_method=sign_method, weighted_sign=weighted_sign, divisor=divisor)
    else:
        merged = (blocks * weight_tensor(w, blocks)).sum(dim=0)
    return (u @ merged.to(f64)).to(torch.float32) * lam


#: below this rank/min(m, n) ratio, :func:`low_rank` uses a randomized SVD
RANDOMIZED_BELOW = 0.25


def low_rank(mat: Tensor, rank: int, *, method: str = "auto", oversample: int = 8, niter: int = 4,
             seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """Rank-``rank`` factors ``b (m, r)``, ``a (r, n)`` with ``b @ a ≈ mat`` and the relative Frobenius
    error ``‖mat − b a‖ / ‖mat‖`` (0 for a zero matrix).

    ``method="full"``: truncated full SVD (Eckart–Young optimal). ``"randomized"``: Halko, Martinsson &
    Tropp 2011 (``torch.svd_lowrank`` with ``rank + oversample`` columns and ``niter`` power iterations,
    seeded so the result is reproducible); exact when ``rank(mat) ≤ rank`` (up to float32 rounding), near
    optimal otherwise, and its error is measured, not estimated. ``"auto"``: randomized when
    ``rank < RANDOMIZED_BELOW · min(m, n)`` and the matrix has at least 256 rows and columns, else full.
    """
    check_choice(method, "method", ("auto", "full", "randomized"))
    if mat.dim() != 2:
        raise ConfigError(f"low_rank: expected a matrix, got shape {tuple(mat.shape)}")
    m = f32(mat)
    small = min(m.shape)
    r = max(1, min(int(rank), small))
    use_random = method == "randomized" or (method == "auto" and min(m.shape) >= 256 and r < RANDOMIZED_BELOW * small)
    total = float(torch.linalg.matrix_norm(m))
    if total == 0.0:
        return torch.zeros(m.shape[0], r, device=m.device), torch.zeros(r, m.shape[1], device=m.device), 0.0
    if use_random:
        q = min(r + oversample, small)
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        b = u[:, :r] * s[:r]
        a = v[:, :r].T
        err = float(torch.linalg.matrix_norm(m - b @ a)) / total
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        b = u[:, :r] * s[:r]
        a = vh[:r]
        err = float(s[r:].norm()) / total
    return b.contiguous(), a.contiguous(), err


#: slack of the energy rule, relative to ‖mat‖_F², that absorbs float32 rounding of the singular values
ENERGY_RTOL = 1e-5


def _check_rank(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def extract_low_rank(mat: Tensor, *, rank: Optional[int] = None, energy: Optional[float] = None,
                     max_rank: Optional[int] = None, method: str = "auto", oversample: int = 16, niter: int = 8,
                     seed: int = 0) -> tuple[Tensor, Tensor, float, int]:
    """LoRA factors of a weight difference: ``(b (m, r), a (r, n), relative Frobenius error, r)`` with
    ``b @ a ≈ mat`` (float32, on ``mat``'s device; the error is ``‖mat − b a‖_F / ‖mat‖_F``, 0 for a zero
    matrix, whose r is 1).

    Give exactly one of ``rank`` (a positive integer, at most ``min(m, n)``) or ``energy`` E in (0, 1]: the
    smallest r with ``σ₁² + … + σ_r² ≥ (E − ENERGY_RTOL) · ‖mat‖_F²`` (the total is the exact squared Frobenius
    norm, accumulated in float64; ``ENERGY_RTOL`` = 1e-5 absorbs float32 rounding, so E = 1 gives the exact
    rank), at most ``max_rank`` (only with ``energy``; capped at ``min(m, n)``). When E is not reached
    within ``max_rank`` the rank is ``max_rank``.

    ``method`` as :func:`low_rank`, with more oversampling and power iterations by default than there (an
    extraction is done once: the randomized error is then within ~1e-7 of the optimum for spectra that decay
    like fine-tunes' ΔW). With ``energy``, ``"auto"`` computes only the top ``max_rank +
    oversample`` singular values with the randomized SVD when that is below ``RANDOMIZED_BELOW · min(m, n)``
    (and both sides ≥ 256), else a full SVD; the energy of the singular values not computed is never
    counted, so the chosen rank is never below the one an exact SVD gives.
    """
    check_choice(method, "method", ("auto", "full", "randomized"))
    if not isinstance(mat, Tensor) or mat.dim() != 2:
        raise ConfigError(f"extract_low_rank: expected a matrix, got {tuple(getattr(mat, 'shape', ()))}")
    if (rank is None) == (energy is None):
        raise ConfigError("extract_low_rank: give exactly one of rank or energy")
    small = min(mat.shape)
    if small == 0:
        raise ConfigError(f"extract_low_rank: the matrix {tuple(mat.shape)} is empty")
    if rank is not None:
        r = _check_rank(rank, "rank")
        if max_rank is not None:
            raise ConfigError("max_rank: applies only with energy (rank fixes the rank)")
        if r > small:
            raise ConfigError(f"rank: {r} exceeds min(m, n) = {small} of the {mat.shape[0]}x{mat.shape[1]} matrix")
        b, a, err = low_rank(mat, r, method=method, oversample=oversample, niter=niter, seed=seed)
        return b, a, err, r
    e = check_range(energy, "energy", 0.0, 1.0, low_open=True)
    cap = small if max_rank is None else min(_check_rank(max_rank, "max_rank"), small)
    m = f32(mat)
    total = dot64(m, m)  # ‖mat‖²_F in float64, chunk by chunk
    if total == 0.0:
        return torch.zeros(m.shape[0], 1, device=m.device), torch.zeros(1, m.shape[1], device=m.device), 0.0, 1
    q = min(cap + oversample, small)
    use_random = method == "randomized" or (method == "auto" and small >= 256 and q < RANDOMIZED_BELOW * small)
    if use_random:
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(check_seed(seed))
            u, s, v = torch.svd_lowrank(m, q=q, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    kept = torch.cumsum(s.to(torch.float64) ** 2, dim=0)
    reached = torch.nonzero(kept >= (e - ENERGY_RTOL) * total)
    r = min(int(reached[0]) + 1 if reached.numel() else cap, cap)
    b = (u[:, :r] * s[:r]).contiguous()
    a = vh[:r].contiguous()
    if use_random:
        err = float(torch.linalg.matrix_norm(m - b @ a)) / math.sqrt(total)
    else:
        err = float(s[r:].norm()) / math.sqrt(total)
    return b, a, err, r
