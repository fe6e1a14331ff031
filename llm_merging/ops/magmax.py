"""MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual Learning",
arXiv:2407.06322): per entry, the task-vector value of largest magnitude.

Every function takes task vectors τᵢ = θᵢ − θ₀ of one tensor and returns the merged task vector (float32, on
the inputs' device; the caller adds θ₀). Nothing here is random.

Reference read (reimplemented, not copied): ``danielm1405/magmax`` @ 4f49f18 (``src/merging/task_vectors.py``:
``merge_max_abs``; ``merge_splitted.py`` / ``merge_8datasets.py``: scaling 0.5).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from llm_merging.ops._common import check_choice, check_real, check_tensors, f32

#: which expert wins equal magnitudes: the lowest index (``argmax``) or the highest (the reference's ``>=``)
TIE_BREAKS = ("first", "last")


def magmax(task_vectors: Sequence[Tensor], scale: float = 0.5, tie_break: str = "first") -> Tensor:
    """MagMax (Marczak et al., ECCV 2024, "MagMax: Leveraging Model Merging for Seamless Continual
    Learning", arXiv:2407.06322): ``λ · τ_{i*}`` per entry, i* = argmaxᵢ |τᵢ| (paper eq. 2).

    Ties in |τᵢ| (e.g. x and −x) go to the lowest expert index (``tie_break="first"``, as ``torch.argmax``);
    the authors' ``merge_max_abs`` folds the experts with ``|τ_new| >= |τ_best|``, so its ties go to the
    highest index: ``tie_break="last"``. Default λ 0.5: the reference's scripts' ``scaling_coef``.
    """
    ts = check_tensors(task_vectors)
    lam = check_real(scale, "scale")
    check_choice(tie_break, "tie_break", TIE_BREAKS)
    out = f32(ts[0]).detach().clone()
    best = out.abs()
    for t in ts[1:]:
        t = f32(t)
        a = t.abs()
        take = a > best if tie_break == "first" else a >= best
        out = torch.where(take, t, out)
        best = torch.where(take, a, best)
    return out if lam == 1.0 else out.mul_(lam)


__all__ = ["TIE_BREAKS", "magmax"]
