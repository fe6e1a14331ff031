"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models") for one
dense layer: the weight that best reproduces every expert's outputs on its own inputs."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import PerModel, check_real, check_tensors, weight_list


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``G' = α G + (1 − α) diag(G)``: the off-diagonal entries scaled by ``alpha`` (a new tensor)."""
    out = gram.to(torch.float32) * float(alpha)
    out.diagonal().add_(gram.diagonal().to(torch.float32), alpha=1.0 - float(alpha))
    return out


def regmean(task_vectors: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 0.9,
            weights: Optional[PerModel] = None, *, transposed: bool = False, ridge: float = 1e-6) -> Tensor:
    """RegMean's merged task vector of a dense layer ``y = x Wᵀ`` (torch layout: W is (out, in)).

    With ``Gᵢ = XᵢᵀXᵢ`` (in × in) the Gram matrix of expert i's inputs to the layer and ``G'ᵢ`` its
    off-diagonal entries scaled by ``alpha``, the merged weight is ``W = (Σ wᵢ Wᵢ G'ᵢ)(Σ wᵢ G'ᵢ)⁻¹``: at
    ``alpha = 1`` it minimises ``Σ wᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²``; at ``alpha = 0`` it is the per-input-dimension
    average of the columns weighted by ``wᵢ·(Gᵢ)_dd``. Since ``(Σ G')⁻¹ Σ G' W₀ = W₀`` this works on task
    vectors: returns ``τ = (Σ wᵢ τᵢ G'ᵢ)(Σ wᵢ G'ᵢ)⁻¹``. ``transposed``: weights stored (in, out) (GPT-2's
    Conv1D). ``ridge``: ``ridge · mean(diag Σ wᵢG'ᵢ)/Σ wᵢ · I`` is added to each ``G'ᵢ`` (an input dimension no
    token uses then gets the weighted mean of the τᵢ); 0 for none.
    """
    ts = check_tensors(task_vectors)
    gs = check_tensors(grams, "grams")
    if len(gs) != len(ts):
        raise ConfigError(f"grams: {len(gs)} Gram matrices for {len(ts)} task vectors")
    if ts[0].dim() != 2:
        raise ConfigError(f"regmean merges 2-D weights, got shape {tuple(ts[0].shape)}")
    a = check_real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"alpha={a}: expected a value in [0, 1]")
    w = weight_list(weights, len(ts))
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"weights {w}: RegMean needs non-negative weights with a positive sum")
    n_in = ts[0].shape[0] if transposed else ts[0].shape[1]
    if tuple(gs[0].shape) != (n_in, n_in):
        raise ConfigError(f"grams: shape {tuple(gs[0].shape)} does not fit a layer with {n_in} inputs")
    device = ts[0].device
    lhs = torch.zeros((n_in, n_in), dtype=torch.float32, device=device)
    rhs = None
    for wi, t, g in zip(w, ts, gs):
        if wi == 0:
            continue
        gp = reduce_off_diagonal(g.to(device), a).mul_(wi)
        lhs.add_(gp)
        tt = t.to(torch.float32) if transposed else t.to(torch.float32).T  # (in, out)
        term = gp @ tt
        rhs = term if rhs is None else rhs.add_(term)
        del gp, term
    mean_tau = sum(wi * (t.to(torch.float32) if transposed else t.to(torch.float32).T) for wi, t in zip(w, ts)) / sum(w)
    scale = float(lhs.diagonal().mean()) / sum(w)
    if not scale > 0:  # no input ever reached the layer: nothing to fit, keep the weighted mean
        out = mean_tau
    else:
        eps = float(ridge) * scale
        if eps > 0:
            lhs.diagonal().add_(eps * sum(w))
            rhs.add_(mean_tau, alpha=eps * sum(w))
        out = torch.linalg.solve(lhs, rhs)
    return (out if transposed else out.T).contiguous()
