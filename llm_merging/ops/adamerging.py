"""AdaMerging (Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning"): the pieces
of its gradient that are pure tensor math.

Layer-wise AdaMerging merges ``θ_l = θ₀_l + Σᵢ λᵢ,l τᵢ,l`` (``ops.task_arithmetic`` with ``weights=λ``) and
learns λ by minimising the entropy of the merged model's predictions. By the chain rule
``∂L/∂λᵢ,l = Σ_{tensors t of group l} ⟨∂L/∂θ_t, τᵢ,t⟩``, so one backward pass to the merged weights and one
inner product per (expert, tensor) give the whole gradient: no task vector needs to be held during the
backward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError


def entropy(logits: Tensor, mask: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """Shannon entropy ``−Σ p log p`` (nats) of ``softmax(logits)`` along ``dim``, computed in float32.

    ``mask`` (bool, the shape of ``logits``): only the True entries form the distribution (e.g. the
    answer choices of a row, padded with False); a row with no True entry has entropy 0. Differentiable.
    """
    x = logits.to(torch.float32)
    if mask is not None:
        if mask.shape != x.shape:
            raise ConfigError(f"entropy: mask shape {tuple(mask.shape)} does not match logits {tuple(x.shape)}")
        x = x.masked_fill(~mask, torch.finfo(torch.float32).min)  # finite: no 0·∞ in the backward pass
    logp = torch.log_softmax(x, dim=dim)
    terms = logp.exp() * logp  # 0 where the probability underflows (log p stays finite)
    if mask is None:
        return -terms.sum(dim=dim)
    h = -terms.masked_fill(~mask, 0.0).sum(dim=dim)
    return torch.where(mask.any(dim=dim), h, torch.zeros_like(h))


def task_vector_inner(grad: Tensor, task_vector: Optional[Tensor] = None,
                      factors: Optional[tuple[Tensor, Tensor]] = None) -> float:
    """``⟨grad, τ⟩``: the sum of the elementwise product (float32 products, summed in float64).

    Either the task vector itself, or LoRA factors ``(B, A)`` with ``τ = B @ A`` (``grad`` viewed as
    ``(B.shape[0], A.shape[1])``): then ``⟨G, BA⟩ = Σ (G Aᵀ) ⊙ B``, which needs ``out × r`` memory instead
    of forming the ``out × in`` product.
    """
    g = grad.to(torch.float32)
    if factors is not None:
        if task_vector is not None:
            raise ConfigError("task_vector_inner: give the task vector or its factors, not both")
        b, a = factors
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or b.shape[0] * a.shape[1] != g.numel():
            raise ConfigError(f"task_vector_inner: factors {tuple(b.shape)} @ {tuple(a.shape)} do not fit a "
                              f"gradient of shape {tuple(g.shape)}")
        gm = g.reshape(b.shape[0], a.shape[1])
        return float((gm @ a.to(device=g.device, dtype=torch.float32).T).mul_(
            b.to(device=g.device, dtype=torch.float32)).sum(dtype=torch.float64))
    if task_vector is None:
        raise ConfigError("task_vector_inner: give a task vector or its factors")
    if task_vector.shape != g.shape:
        raise ConfigError(f"task_vector_inner: task vector shape {tuple(task_vector.shape)} does not match "
                          f"the gradient's {tuple(g.shape)}")
    return float(torch.mul(g, task_vector.to(device=g.device, dtype=torch.float32)).sum(dtype=torch.float64))
