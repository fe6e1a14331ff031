"""The TIES sign election and disjoint merge, shared by the whole-tensor and the chunked merges.

Every ``consensus="ties"`` variant (TIES, magnitude_prune, DARE-TIES, breadcrumbs-TIES, DELLA, KnOTS-TIES)
ends here: :func:`consensus_merge` (and :func:`consensus_merge_`, its form on a list of tensors with reused
buffers), and :func:`combine` (the consensus merge or the weighted sum of sparsified vectors, times λ),
which :mod:`llm_merging.ops.sparsify` and :mod:`llm_merging.ops.streaming` both call.

Conventions (identical to PEFT ``calculate_majority_sign_mask`` / ``disjoint_merge`` and mergekit
``get_mask``): the elected sign is +1 where the election score is ``>= 0`` (a tie elects +); an entry of
model i takes part when its value is nonzero and has the elected sign (zeros never count).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from llm_merging.ops._common import check_choice, check_real, weighted_sum_f32

SIGN_METHODS = ("total", "frequency")
DIVISORS = ("count", "weight_sum", None)
CONSENSUS = (None, "ties")


class Buffers:
    """Named scratch tensors reused from one chunk to the next (a new one only for a longer chunk or another
    device): a chunked merge's temporaries then take the same memory every chunk, with no fresh pages
    to fault in."""

    def __init__(self) -> None:
        self._t: dict = {}

    def __call__(self, name: object, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """A tensor of ``like``'s shape and device, of ``dtype`` (default: ``like``'s; contents undefined)."""
        dtype = like.dtype if dtype is None else dtype
        m, key = like.numel(), (name, dtype)
        t = self._t.get(key)
        if t is None or t.numel() < m or t.device != like.device:
            t = self._t[key] = torch.empty(m, dtype=dtype, device=like.device)
        return t[:m].view(like.shape)


def _scores(xs: Sequence[Tensor], sign_method: str, buf: Buffers) -> Tensor:
    """Σᵢ xᵢ (``"total"``) or Σᵢ sign xᵢ (``"frequency"``), summed left to right, in ``buf("score")``."""
    score = buf("score", xs[0])
    if sign_method == "total":
        if len(xs) == 1:
            return score.copy_(xs[0])
        torch.add(xs[0], xs[1], out=score)
        for x in xs[2:]:
            score.add_(x)
        return score
    torch.sign(xs[0], out=score)
    tmp = buf("sign", xs[0])
    for x in xs[1:]:
        score.add_(torch.sign(x, out=tmp))
    return score


def _elect_(score: Tensor, finite: bool) -> Tensor:
    """γ = +1 where ``score >= 0`` (−0.0 included), −1 elsewhere (NaN included), float32; ``score`` is
    overwritten when ``finite`` (all entries finite): adding +0.0 turns −0.0 into +0.0 and changes nothing
    else, then γ = copysign(1, score) (two arithmetic passes instead of a compare and a select)."""
    if not finite:
        return torch.where(score >= 0, 1.0, -1.0).to(torch.float32)
    one = torch.ones((), dtype=score.dtype, device=score.device)
    return torch.copysign(one, score.add_(0.0), out=score)


def _all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (a finite sum says so; an overflowing one says no)."""
    return bool(torch.isfinite(x.sum()))


def elect_sign(stacked: Tensor, sign_method: str = "total") -> Tensor:
    """Elected sign γ ∈ {+1, −1} per entry of ``stacked`` ``(N, *shape)``.

    ``"total"``: γ = sign(Σᵢ xᵢ) (TIES paper, PEFT "total", mergekit "sum");
    ``"frequency"``: γ = sign(Σᵢ sign xᵢ) (PEFT "frequency", mergekit "count"). Ties elect +1.
    """
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    score = stacked.sum(dim=0) if sign_method == "total" else torch.sign(stacked).sum(dim=0)
    score = score.to(torch.float32)
    return _elect_(score, _all_finite(score))


def _select_merge(xs: list[Tensor], w: list[float], gamma: Tensor, weighted_sign: bool,
                  divisor: Optional[str]) -> Tensor:
    """The disjoint merge with compares and selects: exact for any input, NaN included (a NaN entry never
    agrees); used when the election score is not finite."""
    num = torch.zeros_like(gamma)  # from +0.0, as the arithmetic form: no −0.0 sum where they would differ
    den = None
    for x, wi in zip(xs, w):
        agree = (x * gamma) > 0  # nonzero with the elected sign
        num.add_(torch.where(agree, x if weighted_sign else x * wi, 0.0))  # x holds wᵢxᵢ when weighted_sign
        if divisor == "count":
            den = agree.to(torch.float32) if den is None else den.add_(agree)
        elif divisor == "weight_sum":
            term = torch.where(agree, wi, 0.0)  # = agree·wᵢ in float32
            den = term if den is None else den.add_(term)
    if divisor == "count":
        return num / den.clamp_min(1.0)
    if divisor == "weight_sum":
        return num / torch.where(den == 0, 1.0, den)
    return num


def consensus_merge(
    stacked: Union[Tensor, Sequence[Tensor]],
    weights: Sequence[float],
    *,
    sign_method: str = "total",
    weighted_sign: bool = False,
    divisor: Optional[str] = "count",
) -> Tensor:
    """Sign election + disjoint merge of already-sparsified vectors ``stacked`` (a tensor ``(N, *shape)``
    or a sequence of N float32 tensors of one shape).

    γ is elected over the unweighted vectors (``weighted_sign=False``, TIES paper and PEFT) or over
    ``wᵢ xᵢ`` (``weighted_sign=True``, mergekit). Model i agrees at an entry when its value (weighted when
    ``weighted_sign``) is nonzero with sign γ. Result: ``Σ_agreeing wᵢ xᵢ / D`` with D = number of agreeing
    models (``"count"``, paper/PEFT), Σ of agreeing wᵢ (``"weight_sum"``, mergekit ``normalize=True``; 1
    where that sum is 0) or 1 (``None``, mergekit ``normalize=False``); an entry with no agreeing model is
    +0. ``stacked`` is consumed (its tensors may be overwritten).
    """
    check_choice(divisor, "divisor", DIVISORS)
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    return consensus_merge_([stacked[i] for i in range(len(stacked))], weights, sign_method, weighted_sign, divisor,
                      Buffers())


def consensus_merge_(xs: list[Tensor], weights: Sequence[float], sign_method: str, weighted_sign: bool,
               divisor: Optional[str], buf: Buffers) -> Tensor:
    """:func:`consensus_merge` of the list of tensors ``xs`` (overwritten; no checks of the options), its
    temporaries from ``buf``; the result is a new tensor."""
    w = [float(x) for x in weights]
    if weighted_sign:
        for x, wi in zip(xs, w):
            x.mul_(wi)
    score = _scores(xs, sign_method, buf)
    finite = _all_finite(score)  # then every xᵢ is finite too (an inf or NaN term makes the sum inf or NaN)
    gamma = _elect_(score, finite)
    del score
    if not finite:
        return _select_merge(xs, w, gamma, weighted_sign, divisor)
    # Arithmetic only (a compare + select costs ~20 float passes on the CPU). With γ = ±1 and finite x:
    # r = relu(x·γ) is |x| where x agrees and ±0 elsewhere, so r·γ is x or ±0 and sign(r) the agree
    # indicator (1 or ±0). Sums start from +0.0, so that a −0.0 term never leaves a −0.0 where the
    # compare-and-select form (:func:`_select_merge`) gives +0.0: the two agree bit for bit.
    num = torch.zeros_like(gamma)
    den = buf("den", gamma).zero_() if divisor is not None else None
    r, a = buf("agree", gamma), buf("indicator", gamma)
    for x, wi in zip(xs, w):
        torch.mul(x, gamma, out=r).relu_()
        if divisor == "count":
            den.add_(torch.sign(r, out=a))
        elif divisor == "weight_sum":
            den.add_(torch.sign(r, out=a), alpha=wi)  # agree·wᵢ exactly (float32 wᵢ, as the select form)
        if weighted_sign:
            num.addcmul_(r, gamma)  # + x or ±0: the product is exact, fused or not
        else:
            num.add_(r.mul_(gamma).mul_(wi))  # round(x·wᵢ), then the sum, as the select form
    if divisor == "count":
        return num.div_(den.clamp_min_(1.0))
    if divisor == "weight_sum":
        w32 = torch.tensor(w, dtype=torch.float32).tolist()
        if min(w32) > 0.0:
            # a nonzero sum of positive wᵢ is >= the least of them: only the zeros (where num is +0.0,
            # so num/min = +0.0 = num/1) change
            return num.div_(den.clamp_min_(min(w32)))
        return num.div_(den.add_(torch.rsub(torch.sign(den.abs()), 1.0)))  # den + 1 where den is ±0
    return num


def combine(
    stacked: Union[Tensor, Sequence[Tensor]],
    w: list[float],
    lam: float,
    consensus: Optional[str],
    sign_method: str,
    weighted_sign: bool,
    divisor: Optional[str],
    buffers: Optional[Buffers] = None,
) -> Tensor:
    """The merge of the sparsified vectors ``stacked`` (a tensor ``(N, *shape)`` or N tensors, consumed)
    times λ, as a new tensor; ``buffers``: the chunked paths' reused temporaries."""
    if consensus == "ties":
        xs = [stacked[i] for i in range(len(stacked))]
        out = consensus_merge_(xs, w, sign_method, weighted_sign, divisor,
                               buffers if buffers is not None else Buffers())
    else:
        out = weighted_sum_f32(stacked, w)
    return out if lam == 1.0 else out.mul_(lam)  # out is new; x·1 is x: skip a pass


def common_checks(consensus, sign_method, divisor, scale) -> float:
    """Check the options every sparsify-then-merge method shares; return ``scale`` as a float."""
    check_choice(consensus, "consensus", CONSENSUS)
    check_choice(sign_method, "sign_method", SIGN_METHODS)
    check_choice(divisor, "divisor", DIVISORS)
    return check_real(scale, "scale")
