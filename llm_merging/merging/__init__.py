"""Merge methods: the ``Merges`` base class and discovery of registered methods.

Methods are registered as entry points in the group ``llm_merging.merging.Merges`` (setup.py reads
``BUILTIN_METHODS`` below, its one home). Running from a source tree that is not installed, the
built-in table is used directly.
"""
from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points

from llm_merging.core.errors import ConfigError
from llm_merging.merging.Merges import Merges

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llm_merging.merging.Merges"

# name -> "module:Class" (setup.py turns these into entry points)
BUILTIN_METHODS = {
    "llama_avg": "llm_merging.merging.LlamaAvg:LlamaAvg",
    "tiny_llama_avg": "llm_merging.merging.TinyLlamaAvg:TinyLlamaAvg",
    "flan_t5_avg": "llm_merging.merging.FlanT5Avg:FlanT5Avg",
    "flant5_avg": "llm_merging.merging.FlanT5Avg:FlanT5Avg",
    "linear": "llm_merging.merging.Linear:Linear",
    "task_arithmetic": "llm_merging.merging.TaskArithmetic:TaskArithmetic",
    "ties_merge": "llm_merging.merging.TiesMerge:TiesMerge",
    "dare_linear": "llm_merging.merging.DareLinear:DareLinear",
    "dare_ties": "llm_merging.merging.DareTies:DareTies",
    "magnitude_prune": "llm_merging.merging.MagnitudePrune:MagnitudePrune",
    "breadcrumbs": "llm_merging.merging.Breadcrumbs:Breadcrumbs",
    "breadcrumbs_ties": "llm_merging.merging.BreadcrumbsTies:BreadcrumbsTies",
    "della": "llm_merging.merging.Della:Della",
    "della_linear": "llm_merging.merging.DellaLinear:DellaLinear",
    "slerp": "llm_merging.merging.Slerp:Slerp",
    "model_stock": "llm_merging.merging.ModelStock:ModelStock",
    "geometric_median": "llm_merging.merging.GeometricMedian:GeometricMedian",
    "tsv_merge": "llm_merging.merging.TsvMerge:TsvMerge",
    "iso_c": "llm_merging.merging.IsoC:IsoC",
    "iso_cts": "llm_merging.merging.IsoCts:IsoCts",
    "wudi": "llm_merging.merging.Wudi:Wudi",
    "knots_ties": "llm_merging.merging.KnotsTies:KnotsTies",
    "passthrough": "llm_merging.merging.Passthrough:Passthrough",
    "nuslerp": "llm_merging.merging.Nuslerp:Nuslerp",
    "multislerp": "llm_merging.merging.Multislerp:Multislerp",
    "karcher": "llm_merging.merging.Karcher:Karcher",
    "sce": "llm_merging.merging.Sce:Sce",
    "ram": "llm_merging.merging.Ram:Ram",
    "ramplus_tl": "llm_merging.merging.RamplusTl:RamplusTl",
    "nearswap": "llm_merging.merging.Nearswap:Nearswap",
    "arcee_fusion": "llm_merging.merging.ArceeFusion:ArceeFusion",
    "regmean": "llm_merging.merging.Regmean:Regmean",
    "regmean_plus": "llm_merging.merging.RegmeanPlus:RegmeanPlus",
    "fisher": "llm_merging.merging.Fisher:Fisher",
    "adamerging": "llm_merging.merging.AdaMerging:AdaMerging",
    "lines": "llm_merging.merging.Lines:Lines",
    "cart": "llm_merging.merging.Cart:Cart",
    "star": "llm_merging.merging.Star:Star",
    "pcb_merging": "llm_merging.merging.PcbMerging:PcbMerging",
    "magmax": "llm_merging.merging.MagMax:MagMax",
    "consensus_ta": "llm_merging.merging.ConsensusTa:ConsensusTa",
    "consensus_ties": "llm_merging.merging.ConsensusTies:ConsensusTies",
    "expo": "llm_merging.merging.Expo:Expo",
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_targets() -> dict[str, str]:
    """Every known method name -> ``module:Class`` (installed entry points win over the built-ins)."""
    targets = dict(BUILTIN_METHODS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets[ep.name] = ep.value
    return targets


def all_merge_handlers() -> dict[str, type]:
    """Load every registered merge class (the starter kit's function name)."""
    loaded = {}
    for name, target in sorted(method_targets().items()):
        try:
            loaded[name] = _load(target)
        except Exception as exc:  # one broken plugin must not hide the others
            logger.warning("cannot load merge method '%s' (%s): %s", name, target, exc)
    return loaded


def get_method_class(name: str) -> type:
    """The class registered as ``name`` (or given directly as ``module:Class``); ConfigError naming
    close matches when unknown."""
    if ":" in name:
        try:
            return _load(name)
        except Exception as exc:
            raise ConfigError(f"merge class '{name}' cannot be imported: {exc}") from None
    targets = method_targets()
    if name not in targets:
        close = difflib.get_close_matches(name, list(targets), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --list"
        raise ConfigError(f"unknown merge method '{name}'{hint}")
    try:
        return _load(targets[name])
    except Exception as exc:
        raise ConfigError(f"merge method '{name}' ({targets[name]}) cannot be imported: {exc}") from None


__all__ = ["Merges", "ENTRY_POINT_GROUP", "BUILTIN_METHODS", "all_merge_handlers", "get_method_class", "method_targets"]
