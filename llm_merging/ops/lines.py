"""LiNeS (Wang et al., ICLR 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging"; reference code ``wang-kee/LiNeS``, ``src/eval/eval.py`` ``LiNeS_scaling``): a task vector scaled by a
factor that grows linearly with the depth of the layer it belongs to.

Conventions of the reference, kept here: layer ``l`` is the 0-based index of a residual block and ``L`` the
number of blocks of the model, so ``λ(l) = α + β·l/(L−1)`` runs from α (first block) to α + β (last block);
every tensor outside the blocks (embeddings, final norm, head) gets α. With a single block (L = 1) the
reference divides by zero; here the block gets α (as the LLM ports of the reference do).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from llm_merging.core.errors import ConfigError
from llm_merging.ops._common import check_real, f32


def lines_scale(layer: Optional[int], num_layers: Optional[int], alpha: float, beta: float) -> float:
    """The LiNeS factor ``λ(l) = α + β·l/(L−1)`` of block ``layer`` (0-based) of ``num_layers``; ``α`` when
    ``layer`` is None (a tensor outside the blocks) or ``num_layers`` is 1."""
    a = check_real(alpha, "alpha")
    b = check_real(beta, "beta")
    if layer is None:
        return a
    if isinstance(layer, bool) or not isinstance(layer, int) or isinstance(num_layers, bool) or \
            not isinstance(num_layers, int) or num_layers < 1 or not 0 <= layer < num_layers:
        raise ConfigError(f"lines: layer must be an integer in [0, num_layers), got layer={layer!r}, "
                          f"num_layers={num_layers!r}")
    if num_layers == 1:
        return a
    return a + b * (layer / (num_layers - 1))


def lines(task_vector: Tensor, layer: Optional[int], num_layers: Optional[int], alpha: float, beta: float) -> Tensor:
    """``λ(l) · τ`` (a new float32 tensor) with ``λ`` from :func:`lines_scale`."""
    if not isinstance(task_vector, Tensor):
        raise ConfigError(f"task_vector: expected a torch.Tensor, got {type(task_vector).__name__}")
    return torch.mul(f32(task_vector), lines_scale(layer, num_layers, alpha, beta))
