"""``regmean_plus``: RegMean++ (2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression
Mean for Model Merging"): RegMean with each layer's inputs taken from the partially merged model.

Layers are merged in order. The inputs of layer l's dense layers come from running expert i's calibration
prompts through the model whose earlier layers are already merged (cross-layer dependence) while layer l
itself holds expert i's weights (intra-layer dependence), so Gᵢ differs from RegMean's wherever the
merged earlier layers differ from expert i's. Cost: one forward pass per layer, per expert, each stopped
after that layer (about L/2 full passes per expert for L layers); statistics are never reused between
``--search`` candidates (they depend on the merge). With the same prompts for every expert and LoRA only on
the first projections of each layer (e.g. q/v), every Gᵢ is the same and the result is their mean:
give each expert its own prompts (``--calibration-data I=FILE``) for the method's intended use.
"""
from __future__ import annotations

from llm_merging.merging.Regmean import Regmean


class RegmeanPlus(Regmean):
    """RegMean++ (2025): RegMean with each layer's inputs from the partially merged model (layers merged in order)."""

    sequential = True
