"""WUDI merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", arXiv:2503.08099; reference code ``nathanielyvo/WUDI-Merging``).

For the weight of one linear layer (torch layout, ``out × in``) with task vectors τᵢ, WUDI looks for the
merged task vector τ_m minimising

    L(τ_m) = Σᵢ ‖(τ_m − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F

(the rows of τᵢ stand in for the inputs of task i, so the interference (τ_m − τᵢ)x is penalised where task
i's inputs live). The reference code starts from τ_m = Σ τᵢ and takes 300 Adam steps (learning rate 1e-5,
float32, default betas and ε, no weight decay) on the summed loss; :func:`wudi` does the same
(``solver="adam"``) or solves the quadratic exactly (``solver="closed_form"``).

The loss is quadratic: with aᵢ = 1/‖τᵢ‖², Gᵢ = τᵢᵀτᵢ and A = Σ aᵢ Gᵢ (in × in),

    ∇L(X) = 2 Σ aᵢ (X − τᵢ) Gᵢ = 2 (X A − Σ aᵢ τᵢ Gᵢ),

so every minimiser solves X A = Σ aᵢ τᵢ τᵢᵀ τᵢ; the closed form is X₀ − R₀ A⁺ with X₀ = Σ τᵢ and
R₀ = Σ aᵢ (X₀ − τᵢ) Gᵢ (the gradient at X₀, halved), i.e. the solution nearest to Σ τᵢ (in float64, with
eigenvalues of A below ``in · ε₆₄ · λ_max`` treated as 0). Because only A and R₀ enter the gradient, one
Adam step costs one product with A instead of the reference's two per expert, and the same steps are
taken (the gradient is the reference's up to float32 rounding; it is exactly 0 where the reference's is,
e.g. for one expert). A task vector that is exactly 0 (an expert that does not touch the tensor) has no
term (the reference divides 0 by 0).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import check_choice, check_real, check_tensors, f32, norm64

#: how :func:`wudi` finds the minimiser: the reference's Adam steps, or the exact solution
WUDI_SOLVERS = ("adam", "closed_form")
#: what :func:`wudi_fallback` gives tensors WUDI does not cover: the mean of the task vectors (the
#: authors' LLM code), their sum (task arithmetic), or θ₀ kept (the reference's ViT / RoBERTa scripts)
WUDI_FALLBACKS = ("mean", "sum", "base")
#: the reference code's optimisation (``wudi_main.py``: 300 steps, Adam, learning rate 1e-5)
DEFAULT_STEPS = 300
DEFAULT_LR = 1e-5


def _terms(task_vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[float]]:
    """The task vectors (float32 matrices) with a term in the loss, and their aᵢ = 1/‖τᵢ‖²."""
    ts = check_tensors(task_vectors)
    if ts[0].dim() != 2:
        raise ConfigError(f"wudi: expected matrices (out × in), got shape {tuple(ts[0].shape)}")
    kept, coef = [], []
    for t in ts:
        sq = norm64(t) ** 2
        if sq > 0.0 and math.isfinite(1.0 / sq):
            kept.append(f32(t))
            coef.append(1.0 / sq)
    return kept, coef


def wudi_loss(merged: Tensor, task_vectors: Sequence[Tensor]) -> float:
    """``Σᵢ ‖(merged − τᵢ) τᵢᵀ‖²_F / ‖τᵢ‖²_F`` (zero task vectors have no term), accumulated in float64."""
    ts, coef = _terms(task_vectors)
    x = f32(merged)
    if ts and x.shape != ts[0].shape:
        raise ConfigError(f"merged: shape {tuple(x.shape)} does not match the task vectors {tuple(ts[0].shape)}")
    m, n = x.shape
    total = 0.0
    x64 = x.to(torch.float64)
    for t, a in zip(ts, coef):
        t64 = t.to(torch.float64)
        e = x64 - t64
        if m <= n:  # the reference's (out × out) products
            total += a * float(torch.square(e @ t64.T).sum())
        else:  # ‖E τᵀ‖² = ⟨E, E τᵀτ⟩ (in × in)
            total += a * float((e * (e @ (t64.T @ t64))).sum())
    return total


def wudi_gradient(merged: Tensor, task_vectors: Sequence[Tensor]) -> Tensor:
    """∇ of :func:`wudi_loss` at ``merged``: ``2 Σᵢ (merged − τᵢ) τᵢᵀ τᵢ / ‖τᵢ‖²`` (float32)."""
    ts, coef = _terms(task_vectors)
    x = f32(merged)
    out = torch.zeros_like(x)
    m, n = x.shape
    for t, a in zip(ts, coef):
        e = x - t
        out.add_((e @ t.T) @ t if m <= n else e @ (t.T @ t), alpha=2.0 * a)
    return out


def wudi_fallback(task_vectors: Sequence[Tensor], how: str = "mean", scale: float = 1.0) -> Tensor:
    """The merged task vector of a tensor WUDI does not optimise (biases, norms, embeddings): ``λ·mean(τᵢ)``,
    ``λ·Σ τᵢ`` or zeros (θ₀ kept)."""
    ts = check_tensors(task_vectors)
    check_choice(how, "fallback", WUDI_FALLBACKS)
    lam = check_real(scale, "scale")
    if how == "base":
        return torch.zeros(ts[0].shape, dtype=torch.float32, device=ts[0].device)
    out = f32(ts[0]).clone()
    for t in ts[1:]:
        out += t
    return out.mul_(lam / len(ts) if how == "mean" else lam)


class _Quadratic:
    """The loss around X₀ = Σ τᵢ: ∇L(X₀ + D) = 2 (D A + R₀), with A held in one of three forms.

    ``dense``: A itself (in × in); ``stacked``: M = [√aᵢ τᵢ] (T·out × in), A = MᵀM; ``basis``: an orthonormal
    Q (in × k) spanning every τᵢ's rows and Ã = QᵀAQ (k × k), A = QÃQᵀ (LoRA experts: k = Σ ranks).
    """

    def __init__(self, ts: list[Tensor], coef: list[float], x0: Tensor, form: str, q: Optional[Tensor],
                 dtype: torch.dtype) -> None:
        self.form = form
        self.q = None if q is None else q.to(dtype)
        x0 = x0.to(dtype)
        m, n = x0.shape
        if form == "stacked":
            self.mat = torch.cat([t.to(dtype) * math.sqrt(a) for t, a in zip(ts, coef)], dim=0)
        else:
            k = n if form == "dense" else self.q.shape[1]
            self.mat = torch.zeros((k, k), dtype=dtype, device=x0.device)
        self.r0 = torch.zeros((m, n if self.q is None else self.q.shape[1]), dtype=dtype, device=x0.device)
        for t, a in zip(ts, coef):
            t = t.to(dtype)
            e = x0 - t
            if form == "stacked":
                self.r0.addmm_(e @ t.T, t, alpha=a)
            elif form == "dense":
                g = t.T @ t
                self.mat.add_(g, alpha=a)
                self.r0.addmm_(e, g, alpha=a)
            else:
                tq = t @ self.q
                g = tq.T @ tq
                self.mat.add_(g, alpha=a)
                self.r0.addmm_(e @ self.q, g, alpha=a)
            del e, t

    def half_gradient(self, d: Tensor, out: Tensor) -> Tensor:
        """``out = D A + R₀`` (half the gradient at X₀ + D)."""
        if self.form == "dense":
            return torch.addmm(self.r0, d, self.mat, out=out)
        if self.form == "stacked":
            return torch.addmm(self.r0, d @ self.mat.T, self.mat, out=out)
        return torch.mm(torch.addmm(self.r0, d @ self.q, self.mat), self.q.T, out=out)

    def solve(self) -> Tensor:
        """The minimiser's offset D* = −R₀ A⁺ (A⁺ from an eigen / singular value decomposition)."""
        eps = torch.finfo(self.mat.dtype).eps
        if self.form == "stacked":
            _, s, vh = torch.linalg.svd(self.mat, full_matrices=False)
            lam, vecs = s.square(), vh.T
        else:
            lam, vecs = torch.linalg.eigh(self.mat)
        size = self.mat.shape[1]
        top = float(lam.max()) if lam.numel() else 0.0
        keep = lam > top * size * eps
        if not bool(keep.any()):
            return torch.zeros((self.r0.shape[0], self.mat.shape[1] if self.q is None else self.q.shape[0]),
                               dtype=self.r0.dtype, device=self.r0.device)
        vecs, lam = vecs[:, keep], lam[keep]
        d = -((self.r0 @ vecs) / lam) @ vecs.T
        return d if self.q is None else d @ self.q.T


def _orthonormal_basis(row_basis: Tensor, ts: list[Tensor]) -> Optional[Tensor]:
    """Orthonormal columns (float64) spanning ``row_basis``'s; None unless every τᵢ's rows lie in their span."""
    n = ts[0].shape[1]
    if not isinstance(row_basis, Tensor) or row_basis.dim() != 2 or row_basis.shape[0] != n:
        shape = tuple(row_basis.shape) if isinstance(row_basis, Tensor) else type(row_basis).__name__
        raise ConfigError(f"row_basis: expected a matrix with {n} rows (in × k), got {shape}")
    q, _ = torch.linalg.qr(row_basis.to(device=ts[0].device, dtype=torch.float64))
    q32 = q.to(torch.float32)
    for t in ts:
        residual = float(torch.linalg.matrix_norm(t - (t @ q32) @ q32.T))
        if residual > 1e-4 * float(torch.linalg.matrix_norm(t)):
            return None
    return q


def _adam(param: torch.nn.Parameter, lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam`` (default betas and ε), its fused kernel where the device has one (the same update,
    up to rounding; several times faster on CPU)."""
    try:
        return torch.optim.Adam([param], lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam([param], lr=lr)


def _form(m: int, n: int, count: int, k: Optional[int]) -> str:
    """The cheapest form of A for one gradient (multiply-adds): dense m·n², stacked 2·T·m²·n, basis 2·m·n·k."""
    costs = {"dense": m * n * n, "stacked": 2 * count * m * m * n}
    if k is not None:
        costs["basis"] = 2 * m * n * k
    return min(costs, key=costs.get)


def wudi(
    task_vectors: Sequence[Tensor],
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    *,
    solver: str = "adam",
    scale: float = 1.0,
    row_basis: Optional[Tensor] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> Tensor:
    """WUDI's merged task vector of one linear weight (``out × in`` task vectors τᵢ), times ``scale``.

    ``solver="adam"`` (the reference): from X₀ = Σ τᵢ, ``steps`` Adam steps (``torch.optim.Adam`` with learning
    rate ``lr``, default betas and ε; its fused kernel where there is one) on :func:`wudi_loss`, in float32
    on the inputs' device; ``steps=0`` gives Σ τᵢ. ``"closed_form"``: the exact minimiser nearest to Σ τᵢ (module docstring; float64).
    Zero task vectors have no term; with none left the result is 0. ``row_basis`` (optional, ``in × k``):
    columns spanning the rows of every τᵢ (for LoRA experts the transposed A factors, concatenated); with
    k small the steps cost O(out·in·k) instead of O(out·in²), the same steps up to rounding (checked: a
    basis that does not span them is not used). ``on_step(i)``
    is called after every Adam step (e.g. to stop when a time budget is spent). Deterministic.
    """
    check_choice(solver, "solver", WUDI_SOLVERS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps: expected a non-negative integer, got {steps!r}")
    rate = check_real(lr, "lr")
    if rate <= 0:
        raise ConfigError(f"lr: expected a positive learning rate, got {lr!r}")
    lam = check_real(scale, "scale")
    ts, coef = _terms(task_vectors)
    shape, device = task_vectors[0].shape, task_vectors[0].device
    if not ts:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    x0 = ts[0].clone()
    for t in ts[1:]:
        x0 += t
    if solver == "adam" and steps == 0:
        return x0.mul_(lam)
    m, n = shape
    q = None if row_basis is None else _orthonormal_basis(row_basis, ts)
    form = _form(m, n, len(ts), None if q is None else q.shape[1])
    if solver == "closed_form":
        quad = _Quadratic(ts, coef, x0, form, q if form == "basis" else None, torch.float64)
        return (x0.to(torch.float64) + quad.solve()).to(torch.float32).mul_(lam)
    quad = _Quadratic(ts, coef, x0, form, q if form == "basis" else None, torch.float32)
    d = torch.nn.Parameter(torch.zeros_like(x0))
    d.grad = torch.empty_like(x0)
    opt = _adam(d, rate)
    with torch.no_grad():
        for step in range(steps):
            quad.half_gradient(d.data, d.grad).mul_(2.0)
            opt.step()
            if on_step is not None:
                on_step(step)
        out = x0.add_(d.data)
    del opt, d, quad
    return out.mul_(lam)
