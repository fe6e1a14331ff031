"""STAR (Lee et al., NAACL 2025, "STAR: Spectral Truncation and Rescale for Model Merging"; reference code
``IBM/STAR``, ``merger/STAR.py`` ``star`` and ``runner/*.py``): each task matrix is truncated to the fewest
singular triplets holding η % of its nuclear norm, the kept singular values are rescaled so that the nuclear
norm is unchanged, and the truncated matrices are averaged (equal weights 1/T, the reference's
``weighted_merge`` with ``alphas = 1/T``).

Conventions of the reference, kept here: ``eta`` is a percentage (the reference's ``--eta 40``); the kept rank
is ``r = searchsorted(cumsum(σ), Σσ · η / 100) + 1`` (the smallest r whose Σ_{j<r} σⱼ reaches η % of Σ σ,
at least 1, at most all of them); the kept values become ``σⱼ · Σσ / Σ_{j<r} σⱼ``. The reference merges LoRA
updates, which are all matrices; a 3-D tensor is a stack of matrices (the fused experts of a
mixture-of-experts layer) merged matrix by matrix; other tensors (1-D norms and biases, ≥ 4-D) have no
spectrum and are averaged as they are, and a zero matrix stays zero (the reference would divide 0 by 0 there).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import check_range, check_real, check_tensors, f32, per_matrix, stack_f32


def star_rank(singular_values: Tensor, eta: float) -> int:
    """How many of these singular values (descending) STAR keeps for ``eta`` (a percentage, [0, 100])."""
    e = check_range(eta, "eta", 0.0, 100.0)
    s = singular_values.to(torch.float32).reshape(-1)
    if s.numel() == 0:
        return 0
    target = (s.sum() * e / 100).reshape(1)
    r = int(torch.searchsorted(torch.cumsum(s, dim=0), target)[0]) + 1
    return min(r, s.numel())


def svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U, σ, Vᵀ`` of ``B·A`` (B: m×r, A: r×n, e.g. LoRA factors) without forming it: QR of B and
    of Aᵀ, then the SVD of the small r×r core (float64; results float32 on B's device)."""
    f64 = torch.float64
    qb, rb = torch.linalg.qr(b.to(f64))
    qa, ra = torch.linalg.qr(a.to(f64).T)
    p, s, zh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return (qb @ p).to(torch.float32), s.to(torch.float32), (zh @ qa.T).to(torch.float32)


def star_truncate(matrix: Tensor, eta: float = 40.0, *, factors: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """One task matrix after STAR: the top ``star_rank`` singular triplets, their singular values scaled by
    Σσ / Σσ_kept (same nuclear norm). A new float32 tensor; a zero matrix gives zeros.

    ``factors``: ``(B, A)`` with ``matrix == B·A`` (a LoRA update): the SVD comes from them
    (:func:`svd_of_product`, exact, r×r work instead of m×n; the reference's ``known_rank`` shortcut)."""
    check_range(eta, "eta", 0.0, 100.0)
    m = f32(matrix)
    if m.dim() != 2:
        raise ConfigError(f"star_truncate: expected a matrix, got shape {tuple(m.shape)}")
    if factors is not None:
        u, s, vh = svd_of_product(*factors)
        u, s, vh = u.to(m.device), s.to(m.device), vh.to(m.device)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    total = s.sum()
    if float(total) == 0.0:
        return torch.zeros_like(m)
    r = star_rank(s, eta)
    kept = s[:r]
    scaled = kept * (total / kept.sum())
    return (u[:, :r] * scaled) @ vh[:r]


def star(task_vectors: Sequence[Tensor], eta: float = 40.0, scale: float = 1.0, *,
         factors: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None) -> Tensor:
    """STAR's merged task vector: ``λ · mean(star_truncate(τᵢ, η))`` for matrices, ``λ · mean(τᵢ)`` for every
    other tensor (see the module docstring). SVDs in float32 on the inputs' device; ``factors`` (one
    ``(B, A)`` or None per task vector): low-rank factors of the task vectors that have them."""
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    check_range(eta, "eta", 0.0, 100.0)
    if factors is not None and len(factors) != len(ts):
        raise ConfigError(f"factors: expected one entry per task vector ({len(ts)}), got {len(factors)}")
    if ts[0].dim() == 3 and factors is None:  # a stack of matrices (fused MoE experts): each on its own
        return per_matrix(star, ts, eta, scale)
    if ts[0].dim() != 2:
        return stack_f32(ts).mean(dim=0).mul_(lam)
    out = torch.zeros(ts[0].shape, dtype=torch.float32, device=ts[0].device)
    for i, t in enumerate(ts):
        out.add_(star_truncate(t, eta, factors=None if factors is None else factors[i]))
    return out.div_(len(ts)).mul_(lam)
