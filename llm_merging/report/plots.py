"""PNG figures of the analysis and of a run (matplotlib's Agg canvas: no display, no global backend change).

Each function returns PNG bytes (None when there is nothing to draw); `write_png` writes them atomically.
Every figure has a title and axis labels so that it reads on its own, outside the HTML report.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from llm_merging.core.io import atomic_path

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def figure(width: float, height: float):
    """A matplotlib figure (inches) on its own Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    """``fig`` laid out and rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_png(path: str | Path, png: bytes) -> Path:
    """Write PNG bytes to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


# --------------------------------------------------------------------------------------------- analysis
def _layer_axis(doc: dict) -> tuple[list[str], list[dict]]:
    """X axis of the per-layer plots: the layers, or the module types when the model has no numbered layers."""
    layers = doc.get("by_layer") or []
    if layers:
        return [str(x["layer"]) for x in layers], layers
    modules = doc.get("by_module") or {}
    return list(modules), list(modules.values())


def _ticks(ax, labels: Sequence[str]) -> None:
    step = max(1, len(labels) // 24)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels([labels[i] for i in range(0, len(labels), step)], rotation=90 if len(labels) > 12 else 0,
                       fontsize=8)


def cosine_heatmap(doc: dict) -> bytes | None:
    """Pairwise cosine similarity of the experts' whole task vectors."""
    overall = doc.get("overall")
    if not overall:
        return None
    labels = [e["label"] for e in doc["experts"]]
    n = len(labels)
    matrix = [[(v if v is not None else float("nan")) for v in row] for row in overall["cosine"]]
    size = 2.6 + 0.55 * n
    fig = figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = overall["cosine"][i][j]
            ax.text(j, i, "–" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if v is not None and abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine")
    ax.set_title("Task-vector cosine similarity")
    return png_bytes(fig)


def _pairs(n: int, limit: int = 6) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)][:limit]


def conflict_per_layer(doc: dict) -> bytes | None:
    """Sign conflict of each pair per layer, at the TIES density (solid) and dense (dashed)."""
    labels, items = _layer_axis(doc)
    n = len(doc["experts"])
    if not items or n < 2:
        return None
    names = [e["label"] for e in doc["experts"]]
    fig = figure(max(6.0, 0.22 * len(labels) + 3) + 3.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(labels)))
    dens = doc.get("density") or []
    dtext = f"density {dens[0]:g}" if dens and len(set(dens)) == 1 else "TIES density"
    for k, (i, j) in enumerate(_pairs(n)):
        color = _COLORS[k % len(_COLORS)]
        for key, style, tag in (("density", "-", dtext), ("dense", "--", "dense")):
            y = [_nan(it["sign_conflict"][key][i][j]) for it in items]
            ax.plot(x, y, style, color=color, marker="o" if style == "-" else None, markersize=3,
                    label=f"{names[i]} × {names[j]} ({tag})")
    if n >= 3:
        y = [_nan(it["all_experts_conflict"]["density"]) for it in items]
        ax.plot(x, y, "-", color="black", linewidth=2, label=f"all experts ({dtext})")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.text(0, 0.51, "unrelated signs", color="grey", fontsize=7)
    ax.set_ylim(0, 1)
    _ticks(ax, labels)
    ax.set_xlabel("layer" if doc.get("by_layer") else "module")
    ax.set_ylabel("sign conflict (share of shared nonzero coordinates)")
    ax.set_title("Sign conflict per layer")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return png_bytes(fig)


def norms_per_layer(doc: dict) -> bytes | None:
    """Task-vector norm of each expert per layer."""
    labels, items = _layer_axis(doc)
    if not items:
        return None
    fig = figure(max(6.0, 0.22 * len(labels) + 3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(labels)))
    for i, e in enumerate(doc["experts"]):
        ax.plot(x, [it["norm"][i] for it in items], "-o", markersize=3, color=_COLORS[i % len(_COLORS)],
                label=f"{e['label']} ({e['kind']})")
    _ticks(ax, labels)
    ax.set_xlabel("layer" if doc.get("by_layer") else "module")
    ax.set_ylabel("‖τ‖₂")
    ax.set_title("Task-vector norm per layer")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def effective_rank_per_layer(doc: dict) -> bytes | None:
    """Mean effective rank of each expert's ΔW per layer (LoRA experts, or full ones with --full-rank)."""
    labels, items = _layer_axis(doc)
    if not items or not any(v is not None for it in items for v in it["effective_rank"]):
        return None
    fig = figure(max(6.0, 0.22 * len(labels) + 3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(labels)))
    for i, e in enumerate(doc["experts"]):
        y = [_nan(it["effective_rank"][i]) for it in items]
        if all(v != v for v in y):
            continue
        ax.plot(x, y, "-o", markersize=3, color=_COLORS[i % len(_COLORS)], label=e["label"])
        ranks = [it["lora_rank"][i] for it in items if it["lora_rank"][i]]
        if ranks:
            ax.axhline(max(ranks), color=_COLORS[i % len(_COLORS)], linestyle=":", linewidth=0.8)
    _ticks(ax, labels)
    ax.set_xlabel("layer" if doc.get("by_layer") else "module")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("effective rank (dotted: LoRA rank r)")
    ax.set_title("Effective rank of ΔW per layer (Roy & Vetterli)")
    ax.legend(fontsize=7)
    return png_bytes(fig)


def analysis_figures(doc: dict) -> dict[str, bytes]:
    """Every analysis figure that has something to show, by file stem."""
    figures = {"cosine_heatmap": cosine_heatmap(doc), "sign_conflict_per_layer": conflict_per_layer(doc),
               "norms_per_layer": norms_per_layer(doc), "effective_rank_per_layer": effective_rank_per_layer(doc)}
    return {k: v for k, v in figures.items() if v is not None}


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------------------------- run
def scores_figure(rows: dict[str, dict[str, float | None]],
                  metric: str = "main score (accuracy, rougeL, or their mean)") -> bytes | None:
    """Grouped bars: per dataset, the merged model next to the base and each expert.

    ``rows``: ``{dataset: {model label: value}}`` (``merged`` first by convention).
    """
    datasets = [d for d, values in rows.items() if any(v is not None for v in values.values())]
    if not datasets:
        return None
    models: list[str] = []
    for d in datasets:
        for m in rows[d]:
            if m not in models:
                models.append(m)
    width = 0.8 / max(len(models), 1)
    fig = figure(max(5.0, 1.4 * len(datasets) * max(1, len(models)) / 2 + 2) + 1.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for k, m in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(datasets))]
        ys = [_nan(rows[d].get(m)) for d in datasets]
        color = "black" if m == "merged" else ("#7f7f7f" if m == "base" else _COLORS[k % len(_COLORS)])
        bars = ax.bar(xs, ys, width=width * 0.95, color=color, label=m)
        for b, y in zip(bars, ys):
            if y == y:
                ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title("Scores: merged vs base vs experts" if len(models) > 1 else "Scores of the merged model")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png_bytes(fig)


def phases_figure(phases: dict[str, float], budget: float | None = None) -> bytes | None:
    """Horizontal bars: seconds per phase (the evaluate:<dataset> parts nested under evaluate)."""
    items = [(k, float(v)) for k, v in phases.items() if v is not None]
    if not items:
        return None
    fig = figure(6.5, 0.9 + 0.32 * len(items))
    ax = fig.add_subplot(1, 1, 1)
    labels = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    colors = ["#9ecae1" if ":" in k else "#3182bd" for k in labels]
    bars = ax.barh(range(len(items)), values, color=colors)
    for b, v in zip(bars, values):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.2f} s", va="center", fontsize=7)
    ax.set_yticks(range(len(items)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("seconds" + (f" (budget {budget:g} s)" if budget else ""))
    ax.set_title("Time per phase")
    ax.set_xlim(0, max(values) * 1.25 if max(values) > 0 else 1)
    return png_bytes(fig)
