"""Pure per-tensor merge math: no I/O, no Hugging Face objects.

Conventions: inputs are same-shape tensors (never modified); results are new float32 tensors on the
inputs' device. Most functions take task vectors τᵢ = θᵢ − θ₀ and return the merged task vector (the
caller adds θ₀); ``linear``, ``slerp``/``lerp`` and ``geometric_median`` work on whatever they are given.
Per-model hyperparameters accept a number or one number per model; bad values raise
:class:`llm_merging.core.errors.ConfigError` naming the parameter.
"""
from __future__ import annotations

from llm_merging.ops._common import derive_seed
from llm_merging.ops.adamerging import entropy, task_vector_inner
from llm_merging.ops.basic import divide_by_weight_sum, expo, linear, task_arithmetic
from llm_merging.ops.cart import cart, cart_rank
from llm_merging.ops.consensus import consensus_merge, elect_sign
from llm_merging.ops.fisher import diagonal_fisher, fisher_merge, greedy_log_likelihood
from llm_merging.ops.geometric_median import geometric_median
from llm_merging.ops.lines import lines, lines_scale
from llm_merging.ops.magmax import magmax
from llm_merging.ops.masks import (
    apply_mask,
    breadcrumbs_mask,
    della_keep_probabilities,
    della_mask,
    magnitude_mask,
    random_mask,
)
from llm_merging.ops.mergekit_methods import (
    arcee_fusion,
    arcee_fusion_importance,
    nearswap,
    ram,
    ramplus_tl,
    sce,
    sce_mask,
)
from llm_merging.ops.model_stock import model_stock, model_stock_ratio
from llm_merging.ops.pcb import pcb, pcb_scores
from llm_merging.ops.regmean import reduce_off_diagonal, regmean
from llm_merging.ops.slerp import lerp, slerp
from llm_merging.ops.sparsify import breadcrumbs, dare, della, magnitude_prune
from llm_merging.ops.spherical import karcher, multislerp, nuslerp
from llm_merging.ops.star import star, star_rank, star_truncate
from llm_merging.ops.svd import extract_low_rank, iso_c, iso_cts, knots, low_rank, tsv
from llm_merging.ops.tall import consensus_mask, consensus_ta, consensus_ties, tall_masks
from llm_merging.ops.ties import ties
from llm_merging.ops.wudi import wudi, wudi_fallback, wudi_gradient, wudi_loss

__all__ = [
    "apply_mask",
    "arcee_fusion",
    "arcee_fusion_importance",
    "breadcrumbs",
    "breadcrumbs_mask",
    "cart",
    "cart_rank",
    "consensus_mask",
    "consensus_merge",
    "consensus_ta",
    "consensus_ties",
    "dare",
    "della",
    "della_keep_probabilities",
    "della_mask",
    "derive_seed",
    "diagonal_fisher",
    "elect_sign",
    "entropy",
    "divide_by_weight_sum",
    "expo",
    "fisher_merge",
    "geometric_median",
    "greedy_log_likelihood",
    "iso_c",
    "iso_cts",
    "karcher",
    "knots",
    "low_rank",
    "extract_low_rank",
    "lerp",
    "linear",
    "lines",
    "lines_scale",
    "magmax",
    "magnitude_mask",
    "magnitude_prune",
    "model_stock",
    "model_stock_ratio",
    "multislerp",
    "nearswap",
    "nuslerp",
    "pcb",
    "pcb_scores",
    "ram",
    "ramplus_tl",
    "random_mask",
    "reduce_off_diagonal",
    "regmean",
    "sce",
    "sce_mask",
    "slerp",
    "star",
    "star_rank",
    "star_truncate",
    "tall_masks",
    "task_arithmetic",
    "task_vector_inner",
    "ties",
    "tsv",
    "wudi",
    "wudi_fallback",
    "wudi_gradient",
    "wudi_loss",
]
