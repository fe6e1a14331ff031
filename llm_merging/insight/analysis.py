"""Task-vector analysis: how much the experts agree, where they differ, and what that means for merging.

Streams the parameters like the merge engine (θ₀ read from the base checkpoint, each expert's τ = θᵢ − θ₀
from `expert.delta`, one tensor × experts in memory, LoRA adapters and full fine-tunes alike) and collects,
per tensor, additive sums from which every figure is derived for any group of tensors (the whole model, a
layer, a module type such as ``self_attn.q_proj``, a family such as attention or MLP):
* **norm** ‖τᵢ‖₂ over the group (square root of the summed squares);
* **cosine** τᵢ·τⱼ / (‖τᵢ‖ ‖τⱼ‖) of the concatenated task vectors of the group;
* **sign conflict** of a pair: among coordinates where both task vectors are nonzero, the share with
  opposite signs; computed dense (density 1.0) and after trimming each τᵢ to its top-k entries by |·| per
  tensor at the TIES density (``ops.magnitude_mask``, the merge's own rule). Unrelated signs give 0.5,
  identical experts 0. **All-experts conflict**: among coordinates where at least two experts are nonzero,
  the share where both signs occur (what TIES' sign election resolves);
* **mask overlap**: Jaccard index |Mᵢ ∩ Mⱼ| / |Mᵢ ∪ Mⱼ| of the top-k masks (nonzero entries only), with the
  value two independent random masks of the same sizes would have (pᵢpⱼ / (pᵢ + pⱼ − pᵢpⱼ)) for reference;
* **effective rank** of each LoRA ΔW = s·B·A (Roy & Vetterli 2007: exp of the Shannon entropy of the
  singular values normalised to sum 1; between 1 and the LoRA rank r), from the factors through two QR
  decompositions (no m × n SVD). Full fine-tunes get it only with ``full_rank=True`` (an SVD per matrix).

`analyze` returns the ``analysis.json`` document; `write_analysis` writes it and its plots atomically.
The CLI is ``llm-merging analyze --base-model REF --models REF ...`` or ``--analyze`` on a run.
"""
from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from llm_merging import ops
from llm_merging.core.errors import ConfigError
from llm_merging.core.io import atomic_write_json
from llm_merging.merging import settings
from llm_merging.merging.hparams import DENSITY
from llm_merging.merging.settings import layer_index
from llm_merging.model.checkpoint import FullExpert
from llm_merging.model.engine import config_param_shapes
from llm_merging.model.refs import hf_token
from llm_merging.report import plots

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # elements per step of the pairwise figures (bounds temporaries; float32 sums stay exact)

# verdict thresholds (see VERDICT_RULE)
CONFLICT_HIGH = 0.35
COSINE_SIMILAR = 0.5
COSINE_IDENTICAL = 0.95
COSINE_OPPOSING = -0.1
COSINE_ORTHOGONAL = 0.05

VERDICT_RULE = (
    f"Per pair of experts, on the whole model unless a layer range is named: cosine ≥ {COSINE_IDENTICAL} → "
    f"near-identical (any method gives about the same model); cosine ≥ {COSINE_SIMILAR} → similar (plain "
    f"averaging keeps most of both); cosine ≤ {COSINE_OPPOSING} → opposing (summing cancels them). Then, for "
    f"attention and MLP layers separately, the layers whose sign conflict at the TIES density is ≥ "
    f"{CONFLICT_HIGH} (0.5 = unrelated signs, 0 = full agreement) are listed as high conflict: sign-resolving "
    f"methods (TIES, DARE-TIES, DELLA) are likely to help there. Without such layers and with |cosine| < "
    f"{COSINE_ORTHOGONAL}: near-orthogonal, little interference (task arithmetic adds them safely); otherwise "
    f"low to moderate conflict."
)

DEFINITIONS = {
    "norm": "L2 norm of the task vector τ = θ_expert − θ_base over the group's tensors",
    "cosine": "τᵢ·τⱼ / (‖τᵢ‖‖τⱼ‖) over the group's tensors, concatenated",
    "sign_conflict": "pairs: among coordinates where both τ are nonzero (after top-k trimming at the given "
                     "density, per tensor), the share with opposite signs; 'dense' = density 1.0",
    "all_experts_conflict": "among coordinates where at least two experts are nonzero, the share where both "
                            "signs occur",
    "kept_share": "entries kept by the top-k trimming / entries of the tensors the expert changes",
    "mask_overlap": "Jaccard index of the top-k masks at the TIES density (nonzero entries only); "
                    "'mask_overlap_chance' = the value for independent random masks of the same sizes",
    "effective_rank": "Roy & Vetterli (2007): exp(−Σ pₖ log pₖ), pₖ = σₖ / Σσ, singular values of ΔW; "
                      "mean over the group's matrices the expert changes",
}

FAMILIES = ("attention", "mlp", "embedding", "norm", "other")


# --------------------------------------------------------------------------------------------- figures
def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ / Σσ (zero singular values ignored); 0 for ΔW = 0."""
    s = singular_values.detach().double().abs().reshape(-1)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def lora_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` (m × r times r × n) from QR factors: svd(R_b R_aᵀ), r × r."""
    rb = torch.linalg.qr(b.double(), mode="r").R
    ra = torch.linalg.qr(a.double().T, mode="r").R
    return torch.linalg.svdvals(rb @ ra.T)


def matrix_singular_values(delta: torch.Tensor) -> torch.Tensor | None:
    """Singular values of a task-vector matrix (convolutions flattened to (out, −1)); None for vectors."""
    if delta.dim() < 2:
        return None
    return torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())


class Stats:
    """Additive sums over a set of tensors for n experts; `add` merges, `summary` derives the figures."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tensors = 0
        self.numel = 0
        self.sq = np.zeros(n)
        self.dot = np.zeros((n, n))
        self.kept = np.zeros(n, dtype=np.int64)
        self.changed = np.zeros(n, dtype=np.int64)  # coordinates of the tensors the expert changes
        self.both = {"density": np.zeros((n, n), dtype=np.int64), "dense": np.zeros((n, n), dtype=np.int64)}
        self.opposite = {"density": np.zeros((n, n), dtype=np.int64), "dense": np.zeros((n, n), dtype=np.int64)}
        self.inter = np.zeros((n, n), dtype=np.int64)
        self.union = np.zeros((n, n), dtype=np.int64)
        self.chance_inter = np.zeros((n, n))
        self.chance_union = np.zeros((n, n))
        self.multi = {"density": 0, "dense": 0}
        self.mixed = {"density": 0, "dense": 0}
        self.erank_sum = np.zeros(n)
        self.rank_sum = np.zeros(n)
        self.erank_count = np.zeros(n, dtype=np.int64)

    def add_rank(self, i: int, erank: float, lora_rank: float | None) -> None:
        """Count one matrix's effective rank (and LoRA rank) for expert ``i``."""
        self.erank_sum[i] += erank
        self.rank_sum[i] += lora_rank or 0.0
        self.erank_count[i] += 1

    def add(self, other: "Stats") -> "Stats":
        self.tensors += other.tensors
        self.numel += other.numel
        for key in ("sq", "dot", "kept", "changed", "inter", "union", "chance_inter", "chance_union", "erank_sum",
                    "rank_sum", "erank_count"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for key in ("density", "dense"):
            self.both[key] = self.both[key] + other.both[key]
            self.opposite[key] = self.opposite[key] + other.opposite[key]
            self.multi[key] += other.multi[key]
            self.mixed[key] += other.mixed[key]
        return self

    def summary(self) -> dict[str, Any]:
        """Figures of the group (None where undefined: a zero norm, no coordinate both nonzero)."""
        n = self.n
        norms = np.sqrt(self.sq)

        def ratio(num, den):
            return [[(float(num[i][j]) / float(den[i][j]) if den[i][j] > 0 else None) for j in range(n)] for i in range(n)]

        cosine = [[(float(self.dot[i, j] / (norms[i] * norms[j])) if norms[i] > 0 and norms[j] > 0 else None)
                   for j in range(n)] for i in range(n)]
        return {
            "tensors": self.tensors,
            "numel": self.numel,
            "norm": [float(x) for x in norms],
            "cosine": _clip(cosine),
            "sign_conflict": {k: ratio(self.opposite[k], self.both[k]) for k in ("density", "dense")},
            "all_experts_conflict": {k: (self.mixed[k] / self.multi[k] if self.multi[k] else None)
                                     for k in ("density", "dense")},
            "mask_overlap": ratio(self.inter, self.union),
            "mask_overlap_chance": ratio(self.chance_inter, self.chance_union),
            "kept_share": [float(k) / c if c else None for k, c in zip(self.kept, self.changed)],
            "effective_rank": [float(self.erank_sum[i] / self.erank_count[i]) if self.erank_count[i] else None
                               for i in range(n)],
            "lora_rank": [float(self.rank_sum[i] / self.erank_count[i]) if self.rank_sum[i] else None for i in range(n)],
        }


def _clip(matrix: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if v is None else max(-1.0, min(1.0, v)) for v in row] for row in matrix]


@torch.no_grad()
def tensor_stats(task_vectors: Sequence[torch.Tensor], densities: Sequence[float],
                 ranks: Sequence[tuple[float, float | None] | None] | None = None) -> Stats:
    """The sums of one tensor: ``task_vectors[i]`` is expert i's τ (same shape), ``densities[i]`` its TIES
    density, ``ranks[i]`` an optional (effective rank, LoRA rank) of its ΔW.

    Counts are exact (integers); dot products are float32 per chunk, summed in float64."""
    cnz = torch.count_nonzero
    n = len(task_vectors)
    st = Stats(n)
    flat = [t.detach().reshape(-1).float() for t in task_vectors]
    numel = flat[0].numel() if flat else 0
    st.tensors, st.numel = 1, numel
    nonzero = [int(cnz(t)) for t in flat]
    active = [i for i in range(n) if nonzero[i] > 0]  # an expert that leaves the tensor alone adds nothing
    signs: dict[int, torch.Tensor] = {i: torch.sign(flat[i]).to(torch.int8) for i in active}
    trimmed: dict[int, torch.Tensor] = {}
    for i in active:
        d = float(densities[i])
        trimmed[i] = signs[i] if d >= 1.0 else signs[i] * ops.magnitude_mask(flat[i], d)  # sign where kept, else 0
        st.kept[i] = nonzero[i] if d >= 1.0 else int(cnz(trimmed[i]))
        st.changed[i] = numel
    pairs = [(i, j) for a, i in enumerate(active) for j in active[a + 1:]]
    idx = np.array(active, dtype=np.int64)
    m = len(active)
    if m:  # two reused buffers: fresh large allocations cost a page fault per 4 KiB
        width = min(CHUNK, numel)
        buf = torch.empty((m, width), dtype=torch.float32, device=flat[0].device)
        absbuf = torch.empty_like(buf)
    for start in range(0, numel if m else 0, CHUNK):  # per chunk: small Gram matrices (BLAS)
        end = min(start + CHUNK, numel)
        f, both = buf[:, : end - start], absbuf[:, : end - start]
        for r, i in enumerate(active):
            f[r].copy_(flat[i][start:end])
        gram = (f @ f.T).double().cpu().numpy()
        st.sq[idx] += np.diag(gram)
        st.dot[np.ix_(idx, idx)] += np.triu(gram, 1)
        for key in ("dense", "density"):
            if key == "dense":
                sg = f.sign_()
            else:
                sg = f
                for r, i in enumerate(active):
                    sg[r].copy_(trimmed[i][start:end])  # int8 → float32
            torch.abs(sg, out=both)
            agree_minus = (sg @ sg.T).double().cpu().numpy()  # exact: integers below 2**24
            both_n = (both @ both.T).double().cpu().numpy()
            st.both[key][np.ix_(idx, idx)] += np.triu(np.rint(both_n), 1).astype(np.int64)
            st.opposite[key][np.ix_(idx, idx)] += np.triu(np.rint((both_n - agree_minus) / 2), 1).astype(np.int64)
            if m >= 2:
                count, total = both[0].clone(), sg[0].clone()  # row adds: faster than sum(0) on the CPU
                for r in range(1, m):
                    count += both[r]
                    total += sg[r]
                st.multi[key] += int(cnz(count >= 2))
                st.mixed[key] += int(cnz(total.abs_() < count))  # all of one sign iff |Σ sign| = count
    for i, j in pairs:
        st.inter[i, j] = st.both["density"][i, j]  # kept by both = nonzero in both trimmed vectors
        st.union[i, j] = st.kept[i] + st.kept[j] - st.inter[i, j]
        pi, pj = st.kept[i] / numel, st.kept[j] / numel
        st.chance_inter[i, j] = pi * pj * numel
        st.chance_union[i, j] = (pi + pj - pi * pj) * numel
    for m in (st.dot, st.inter, st.union, st.chance_inter, st.chance_union, st.both["dense"], st.both["density"],
              st.opposite["dense"], st.opposite["density"]):
        m += np.triu(m, 1).T  # symmetric
    for i in range(n):  # the diagonal: an expert with itself
        st.dot[i, i] = st.sq[i]
        st.inter[i, i] = st.union[i, i] = st.kept[i]
        st.chance_inter[i, i] = st.chance_union[i, i] = st.kept[i]
        st.both["dense"][i, i] = nonzero[i]
        st.both["density"][i, i] = st.kept[i]
    for i, r in enumerate(ranks or []):
        if r is not None:
            st.add_rank(i, *r)
    return st


# --------------------------------------------------------------------------------------------- grouping
def tensor_group(name: str) -> tuple[tuple[str, int] | None, str, str]:
    """``(layer, module type, family)`` of a parameter name: layer ``(stack prefix, index)`` or None
    (embeddings, final norm, head), module type the path inside the layer without ``.weight``
    (``self_attn.q_proj``), family one of attention, mlp, embedding, norm, other."""
    found = layer_index(name)
    inner = name[len(found[0]) + 1:].split(".", 1)[1] if found else name
    module = inner[: -len(".weight")] if inner.endswith(".weight") else inner
    low = module.lower()
    if "attn" in low or "attention" in low:
        family = "attention"
    elif any(k in low for k in ("mlp", "densereludense", "ffn", "feed_forward", "fc1", "fc2", "c_fc",
                                  "gate_proj", "up_proj", "down_proj", "experts")):
        family = "mlp"
    elif "norm" in low or re.search(r"(^|\.)ln", low):
        family = "norm"
    elif any(k in low for k in ("embed", "wte", "wpe", "shared", "lm_head")):
        family = "embedding"
    else:
        family = "other"
    return found, module, family


def short_names(names: Sequence[str]) -> list[str]:
    """Readable, distinct labels for expert references (last path component; numbered when repeated)."""
    base = [Path(str(n).split("@")[0].rstrip("/")).name or str(n) for n in names]
    out = []
    for i, b in enumerate(base):
        out.append(b if base.count(b) == 1 else f"{b}#{i}")
    return out


# --------------------------------------------------------------------------------------------- streaming
def _expert_rank(expert, name: str, delta: torch.Tensor | None, device, full_rank: bool):
    """(effective rank, LoRA rank or None) of the expert's ΔW for ``name``; None when not computed."""
    if expert.kind == "lora" and expert.low_rank_only(name):
        pair = expert.factors(name, device)
        if pair is not None:
            b, a = pair
            return effective_rank(lora_singular_values(b, a)), float(b.shape[1])
    if full_rank:
        sv = matrix_singular_values(delta)
        if sv is not None:
            return effective_rank(sv), None
    return None


@torch.no_grad()
def analyze(base_dir, experts: Sequence, shapes: dict[str, tuple], *, density: Callable[[str], list[float]] | Sequence[float] | float,
            device: torch.device | str | None = None, full_rank: bool = False, progress: bool = True,
            should_stop: Callable[[], bool] | None = None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Analyse ``experts`` (bound to ``shapes``) against the base checkpoint in ``base_dir``.

    ``density``: the TIES density per expert (a number, a per-expert list, or a function of the tensor
    name giving the per-expert list, e.g. a method's per-tensor resolved values). ``should_stop()`` is
    asked between tensors; True ends the analysis early with ``partial: true``. Returns the
    ``analysis.json`` document.
    """
    n = len(experts)
    if n == 0:
        raise ConfigError("analysis needs at least one expert model")
    if callable(density):
        density_of = density
    else:
        values = [float(density)] * n if isinstance(density, (int, float)) else [float(d) for d in density]
        if len(values) != n:
            raise ConfigError(f"density has {len(values)} values for {n} experts")
        density_of = lambda _name: values  # noqa: E731
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = FullExpert(base_dir, name="base")
    base.bind(shapes)
    touched: set[str] = set()
    for e in experts:
        touched |= set(e.param_names())
    order = [k for k in shapes if k in touched]
    labels = names or short_names([getattr(e, "name", str(e)) for e in experts])
    t0 = time.time()
    per_tensor: list[dict] = []
    stats: dict[str, Stats] = {}
    partial = False
    for name in tqdm(order, desc="analyze", unit="tensor", disable=not progress, leave=False):
        if should_stop is not None and should_stop():
            partial = True
            logger.warning("time budget spent: the analysis stops after %d of %d tensors", len(per_tensor), len(order))
            break
        if name not in base.mapping:
            logger.warning("analysis: base checkpoint in %s lacks '%s'; skipped", base_dir, name)
            continue
        theta0 = base.reader.get(base.mapping[name], device=dev, dtype=torch.float32)
        tvs = []
        for e in experts:
            tv = e.delta(name, theta0)
            tvs.append(torch.zeros_like(theta0) if tv is None else tv.to(device=dev, dtype=torch.float32))
        dens = [float(d) for d in density_of(name)]
        st = tensor_stats(tvs, dens)
        for i, (e, tv) in enumerate(zip(experts, tvs)):
            if st.changed[i]:
                rank = _expert_rank(e, name, tv, dev, full_rank)
                if rank is not None:
                    st.add_rank(i, *rank)
        del tvs, theta0
        layer, module, family = tensor_group(name)
        keys = ["overall", f"family:{family}", f"module:{module}"]
        if layer is not None:
            keys += [f"layer:{layer[0]}:{layer[1]}", f"layerfamily:{layer[0]}:{layer[1]}:{family}"]
        for key in keys:
            stats.setdefault(key, Stats(n)).add(st)
        entry = {"name": name, "layer": _layer_label(layer), "module": module, "family": family,
                 "density": dens, **_compact(st.summary())}
        per_tensor.append(entry)
    base.close()

    first_seen: dict[str, int] = {}  # stacks in the model's order (T5: encoder, then decoder)
    for k, name in enumerate(order):
        layer = tensor_group(name)[0]
        if layer is not None:
            first_seen.setdefault(layer[0], k)
    layers = sorted({(k.split(":")[1], int(k.split(":")[2])) for k in stats if k.startswith("layer:")},
                    key=lambda x: (first_seen.get(x[0], 0), x[1]))
    stacks = sorted({p for p, _ in layers}, key=lambda p: first_seen.get(p, 0))
    by_layer = []
    for prefix, i in layers:
        item = {"layer": _layer_label((prefix, i)), "stack": prefix, "index": i,
                **_compact(stats[f"layer:{prefix}:{i}"].summary())}
        item["families"] = {f: _compact(stats[k].summary()) for f in FAMILIES
                            if (k := f"layerfamily:{prefix}:{i}:{f}") in stats}
        by_layer.append(item)
    doc = {
        "experts": [{"name": getattr(e, "name", str(e)), "label": labels[i], "kind": _kind(e)} for i, e in enumerate(experts)],
        "base": str(base_dir),
        "density": [float(d) for d in density_of(order[0])] if order else None,
        "density_per_tensor": callable(density),
        "definitions": DEFINITIONS,
        "verdict_rule": VERDICT_RULE,
        "thresholds": {"conflict_high": CONFLICT_HIGH, "cosine_similar": COSINE_SIMILAR,
                       "cosine_identical": COSINE_IDENTICAL, "cosine_opposing": COSINE_OPPOSING,
                       "cosine_orthogonal": COSINE_ORTHOGONAL},
        "partial": partial,
        "tensors_analyzed": len(per_tensor),
        "tensors_touched": len(order),
        "seconds": round(time.time() - t0, 3),
        "math_device": str(dev),
        "stacks": stacks,
        "overall": _compact(stats["overall"].summary()) if "overall" in stats else None,
        "by_family": {f: _compact(stats[f"family:{f}"].summary()) for f in FAMILIES if f"family:{f}" in stats},
        "by_module": {k.split(":", 1)[1]: _compact(v.summary()) for k, v in stats.items() if k.startswith("module:")},
        "by_layer": by_layer,
        "tensors": per_tensor,
    }
    doc["verdicts"] = verdicts(doc)
    return doc


def _kind(expert) -> str:
    return expert.kind


def _layer_label(layer: tuple[str, int] | None) -> str | None:
    if layer is None:
        return None
    prefix, i = layer
    stack = prefix.split(".")[0]
    return str(i) if stack in ("model", "transformer", "layers", "h", "gpt_neox", "language_model") else f"{stack} {i}"


def _compact(summary: dict) -> dict:
    """Round floats to 6 significant digits for analysis.json."""

    def r(v):
        if isinstance(v, float):
            return float(f"{v:.6g}") if math.isfinite(v) else None
        if isinstance(v, list):
            return [r(x) for x in v]
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return v

    return r(summary)


# --------------------------------------------------------------------------------------------- verdicts
def _ranges(indices: Sequence[int]) -> str:
    """``[20, 21, ..., 31, 5]`` → ``"5, 20–31"``."""
    xs = sorted(set(indices))
    parts, start = [], None
    for k, x in enumerate(xs):
        if start is None:
            start = x
        if k + 1 == len(xs) or xs[k + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(parts)


def verdicts(doc: dict) -> list[dict]:
    """One verdict per pair of experts, by `VERDICT_RULE`."""
    experts = doc["experts"]
    overall = doc.get("overall")
    out = []
    if overall is None:
        return out
    dens = doc.get("density")
    dens_text = "the TIES density" if not dens else (f"density {dens[0]:g}" if len(set(dens)) == 1 else
                                                     "densities " + "/".join(f"{d:g}" for d in dens))
    for i in range(len(experts)):
        for j in range(i + 1, len(experts)):
            cos = overall["cosine"][i][j]
            conflict = overall["sign_conflict"]["density"][i][j]
            parts, level = [], "moderate"
            if cos is None:
                out.append({"experts": [i, j], "labels": [experts[i]["label"], experts[j]["label"]], "level": "none",
                            "cosine": None, "sign_conflict": conflict, "text": "one of the task vectors is zero: nothing to compare"})
                continue
            if cos >= COSINE_IDENTICAL:
                level = "identical"
                parts.append(f"near-identical task vectors (cosine {cos:.2f}): any merge method gives about the same model")
            elif cos >= COSINE_SIMILAR:
                level = "similar"
                parts.append(f"similar task vectors (cosine {cos:.2f}): plain averaging (linear, task_arithmetic) keeps most of both")
            elif cos <= COSINE_OPPOSING:
                level = "opposing"
                parts.append(f"opposing task vectors (cosine {cos:.2f}): summing cancels them; lower one's weight or "
                             f"resolve signs (TIES)")
            high: dict[str, list[tuple[str, int]]] = {}
            for layer in doc.get("by_layer", []):
                for fam in ("attention", "mlp"):
                    s = layer["families"].get(fam)
                    c = s["sign_conflict"]["density"][i][j] if s else None
                    if c is not None and c >= CONFLICT_HIGH:
                        high.setdefault(fam, []).append((layer["stack"], layer["index"]))
            if high and level not in ("identical",):
                spans = []
                for fam, items in high.items():
                    by_stack: dict[str, list[int]] = {}
                    for stack, idx in items:
                        by_stack.setdefault(stack, []).append(idx)
                    where = "; ".join((f"{stack.split('.')[0]} " if len(doc.get("stacks", [])) > 1 else "") + _ranges(ix)
                                      for stack, ix in by_stack.items())
                    spans.append(f"{'MLP' if fam == 'mlp' else 'attention'} layers {where}")
                level = "conflict" if level == "moderate" else level
                parts.append(f"high conflict in {' and '.join(spans)} (sign conflict ≥ {CONFLICT_HIGH} at {dens_text}): "
                             f"sign-resolving methods such as TIES/DARE-TIES are likely to help")
            elif level == "moderate":
                if abs(cos) < COSINE_ORTHOGONAL:
                    level = "orthogonal"
                    parts.append(f"near-orthogonal with little sign conflict (cosine {cos:.2f}, conflict "
                                 f"{_fmt(conflict)}): task arithmetic adds them with little interference")
                else:
                    parts.append(f"low to moderate conflict (cosine {cos:.2f}, sign conflict {_fmt(conflict)} at {dens_text})")
            out.append({"experts": [i, j], "labels": [experts[i]["label"], experts[j]["label"]], "level": level,
                        "cosine": cos, "sign_conflict": conflict, "text": "; ".join(parts)})
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------------------------- outputs
def write_analysis(doc: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``analysis.json`` and the analysis plots (PNG) under ``out_dir`` atomically; return
    ``{name: path}`` of everything written."""
    out_dir = Path(out_dir)
    written = {}
    for key, png in plots.analysis_figures(doc).items():
        path = out_dir / "plots" / f"{key}.png"
        plots.write_png(path, png)
        written[key] = str(path)
    doc["plots"] = {k: str(Path(v).relative_to(out_dir)) for k, v in written.items()}
    atomic_write_json(out_dir / "analysis.json", doc)
    written["analysis.json"] = str(out_dir / "analysis.json")
    return written


def summary_lines(doc: dict) -> list[str]:
    """A few lines for the terminal: norms, cosines, verdicts."""
    lines = []
    ov = doc.get("overall") or {}
    for e, norm, er in zip(doc["experts"], ov.get("norm", []), ov.get("effective_rank", [])):
        extra = f", effective rank {er:.2f}" if er is not None else ""
        lines.append(f"  {e['label']:<28} {e['kind']:<5} ‖τ‖ = {norm:.4g}{extra}")
    for v in doc.get("verdicts", []):
        lines.append(f"  {v['labels'][0]} × {v['labels'][1]}: {v['text']}")
    return lines


def analyze_method(method, *, density=None, device=None, full_rank: bool = False, progress: bool = True,
                   should_stop: Callable[[], bool] | None = None) -> dict:
    """Analyse the experts of a (preflighted) merge method: its base, its models, and, when the method
    has a ``density`` hyperparameter and no ``density`` is given, its per-tensor resolved densities."""
    base_dir = method.base_ref().resolve(hf_token())
    shapes = config_param_shapes(base_dir, method.architecture)
    experts = method.open_experts(shapes)
    if density is None:
        if "density" in method.hparams:
            n = len(experts)
            if method.layout is None:
                method.layout = settings.Layout(list(shapes), method.slice_lengths)

            def density(name):  # noqa: F811 - the method's value for this tensor
                d = method.resolve_hparams(name, n)["density"]
                return d if isinstance(d, list) else [d] * n
        else:
            density = DENSITY.default
    try:
        return analyze(base_dir, experts, shapes, density=density, device=device, full_rank=full_rank,
                       progress=progress, should_stop=should_stop)
    finally:
        for e in experts:
            close = getattr(e, "close", None)
            if close is not None:
                close()


def parse_density(text: str | None, n: int) -> float | list[float]:
    """``--density``: one TIES density in (0, 1], or one per model, comma-separated (None: the default)."""
    if text is None:
        return DENSITY.default
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--density {text!r}: expected a number in (0, 1] or one per model, comma-separated") from None
    if len(values) not in (1, n):
        raise ConfigError(f"--density has {len(values)} values but --models has {n}")
    for v in values:
        if not (0.0 < v <= 1.0):
            raise ConfigError(f"--density {text!r}: every value must be in (0, 1]")
    return values[0] if len(values) == 1 else values
