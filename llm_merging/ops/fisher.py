"""Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging")."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import PerModel, check_choice, check_range, check_tensors, per_model


def fisher_merge(
    task_vectors: Sequence[Tensor],
    fishers: Sequence[Tensor],
    weights: Optional[PerModel] = None,
    eps: float = 1e-8,
) -> Tensor:
    """Fisher-weighted average of task vectors: ``Σ wᵢ F̃ᵢ τᵢ / Σ wᵢ F̃ᵢ`` per coordinate, ``F̃ᵢ = max(Fᵢ, ε)``.

    The paper's ``θ = Σ wᵢ F̃ᵢ θᵢ / Σ wᵢ F̃ᵢ`` in task-vector form (θᵢ = θ₀ + τᵢ; the θ₀ terms cancel), so
    the caller adds θ₀. ``fishers[i]`` is expert i's diagonal Fisher (same shape as ``τᵢ``, ≥ 0); ``ε``
    (≥ 0) is the paper's ``fisher_floor``: where every Fisher is below it the result is the weighted mean
    of the task vectors. Where ``Σ wᵢ F̃ᵢ = 0`` (ε = 0 and no expert has Fisher there) the result is 0, i.e.
    the base. ``weights`` (≥ 0, default 1) are the paper's per-model coefficients.
    """
    ts = check_tensors(task_vectors)
    fs = check_tensors(fishers, "fishers")
    if len(fs) != len(ts):
        raise ConfigError(f"fishers: expected one per task vector ({len(ts)}), got {len(fs)}")
    if fs[0].shape != ts[0].shape or fs[0].device != ts[0].device:
        raise ConfigError(f"fishers: shape {tuple(fs[0].shape)} on {fs[0].device} does not match the task "
                          f"vectors' {tuple(ts[0].shape)} on {ts[0].device}")
    w = per_model(1.0 if weights is None else weights, len(ts), "weights", low=0.0)
    floor = check_range(eps, "eps", 0.0, float("inf"))
    num = torch.zeros(ts[0].shape, dtype=torch.float32, device=ts[0].device)
    den = torch.zeros_like(num)
    for t, f, wi in zip(ts, fs, w):
        if wi == 0.0:
            continue
        fi = f.to(torch.float32).clamp(min=floor)
        if wi != 1.0:
            fi.mul_(wi)
        den.add_(fi)
        num.addcmul_(fi, t.to(torch.float32))
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), torch.zeros_like(num))


def greedy_log_likelihood(logits: Tensor, mask: Optional[Tensor] = None, reduce: str = "sum") -> Tensor:
    """``Σ_t log p(ŷ_t)`` (``reduce="mean"``: divided by the number of positions) with
    ``ŷ_t = argmax_v logits[..., t, v]``: the log-likelihood of the model's own greedy predictions (the argmax
    is a constant; gradients flow through ``log_softmax`` only).

    ``logits``: ``(..., T, V)``; ``mask`` (``(..., T)``, bool or 0/1): the positions that count (default
    all). Computed in float32; returns a scalar.
    """
    check_choice(reduce, "reduce", ("sum", "mean"))
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    best = logp.detach().argmax(dim=-1, keepdim=True)
    picked = logp.gather(-1, best).squeeze(-1)
    count = picked.numel()
    if mask is not None:
        if mask.shape != picked.shape:
            raise ConfigError(f"greedy_log_likelihood: mask shape {tuple(mask.shape)} does not match the "
                              f"logits' positions {tuple(picked.shape)}")
        picked = picked * mask.to(picked.dtype)
        count = int(mask.sum())
    total = picked.sum()
    return total / max(count, 1) if reduce == "mean" else total


def diagonal_fisher(loss_fn: Callable[[Any], Tensor], examples: Iterable[Any], params: dict[str, Tensor],
                    loss_scale: float = 1.0) -> tuple[dict[str, Tensor], int]:
    """Diagonal Fisher ``F = (1/N) Σₙ (∂ℓₙ/∂θ)²`` from **per-example** gradients (one backward pass per
    example with ``torch.autograd.grad``; ``.grad`` fields are left alone).

    ``loss_fn(example)`` returns example n's scalar ``ℓₙ`` (for Fisher merging: the log-likelihood of the
    model's own predictions, :func:`greedy_log_likelihood`); ``params`` maps names to the tensors (with
    ``requires_grad``) to differentiate. Squares are accumulated in float32 on each parameter's device.
    ``loss_scale``: the backward pass runs on ``loss_scale · ℓₙ`` and the gradients are divided by it in
    float32 (half-precision parameters: small gradients would underflow); an example whose scaled gradients
    overflow is run again at a 64 times smaller scale (down to 1). Returns ``(fisher, N)``; a parameter the
    loss does not reach has Fisher 0 (all zeros when N = 0).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    acc = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for n, t in zip(names, tensors)}
    count = 0
    for example in examples:
        scale = float(loss_scale)
        while True:
            loss = loss_fn(example)
            grads = torch.autograd.grad(loss * scale if scale != 1.0 else loss, tensors, allow_unused=True)
            finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
            if finite or scale <= 1.0:
                break
            scale = max(1.0, scale / 64)
            del loss, grads
        for n, g in zip(names, grads):
            if g is not None:
                g = g.to(torch.float32)
                if scale != 1.0:
                    g.div_(scale)
                acc[n].addcmul_(g, g)
        count += 1
        del loss, grads
    if count:
        for t in acc.values():
            t.div_(count)
    return acc, count
