"""``report.html``: one self-contained page per run (inline CSS, plots embedded as base64 PNG, no script,
no network), written atomically next to report.json.

Sections, always present (saying "not run" when there is nothing): summary, command, models, recipe,
hyperparameters, phases (and budget), memory, scores (with baselines and normalised scores), analysis,
predictions; plus search when a search ran (its PNGs from ``OUT/METHOD/search/`` are embedded).
The run's own figures (scores, time per phase) are also written as PNG under ``OUT/METHOD/plots/``.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from llm_merging.core.io import atomic_write_text
from llm_merging.insight.baselines import dataset_rows, relative_predictions
from llm_merging.report import plots
from llm_merging.report.plots import write_png

logger = logging.getLogger(__name__)

SECTIONS = ("summary", "command", "models", "recipe", "hyperparameters", "phases", "memory", "scores", "analysis",
            "predictions")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.6em;overflow-x:auto;font-size:.85em}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.ok{color:#1a7f37}.bad{color:#b42318}.muted{color:#777}
nav a{margin-right:.8em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return _e("–" if v is None else v)
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return _e(v)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
                cells.append(f'<td class="num">{_num(v)}</td>')
            elif isinstance(v, _Raw):
                cells.append(f"<td>{v.text}</td>")
            else:
                cells.append(f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw:
    """Already escaped HTML for a table cell."""

    def __init__(self, text: str) -> None:
        self.text = text


def _kv(items: dict[str, Any]) -> str:
    rows = []
    for k, v in items.items():
        if isinstance(v, (dict, list)):
            v = _Raw(f"<code>{_e(json.dumps(v, ensure_ascii=False, default=str))}</code>")
        rows.append((k, v))
    return _table(("key", "value"), rows)


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"><figcaption class="muted">{_e(alt)}</figcaption></figure>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _link(href: str, text: str | None = None) -> str:
    return f'<a href="{_e(href)}">{_e(text or href)}</a>'


def _rel(path: Any, out_dir: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(out_dir.resolve()))
    except (ValueError, OSError):
        return str(path)


def _matrix(labels: Sequence[str], matrix: Sequence[Sequence[Any]] | None) -> str:
    if not matrix:
        return '<p class="muted">–</p>'
    return _table(["", *labels], ([labels[i], *row] for i, row in enumerate(matrix)))


def _png_file(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- analysis
def analysis_html(doc: dict | None, out_dir: Path, hint: str = "no analysis (run with --analyze, or use "
                                                                 "<code>llm-merging analyze</code>; a stopped run "
                                                                 "can end before it)") -> str:
    """The analysis section's body from an ``analysis.json`` document (plots from its files, else drawn)."""
    if not doc:
        return f'<p class="muted">{hint}</p>'
    labels = [e["label"] for e in doc["experts"]]
    parts = []
    if doc.get("partial"):
        parts.append(f'<p class="bad">partial: the budget stopped the analysis after {doc.get("tensors_analyzed")} of '
                     f'{doc.get("tensors_touched")} tensors</p>')
    parts.append(f"<p>{doc.get('tensors_analyzed')} tensors in {_num(doc.get('seconds'))} s on {_e(doc.get('math_device'))}; "
                 f"TIES density {_e(_density_text(doc.get('density')))}{' (first tensor; resolved per tensor)' if doc.get('density_per_tensor') else ''}. "
                 f"{_link('analysis.json') if (out_dir / 'analysis.json').exists() else ''}</p>")
    parts.append("<h3>Verdicts</h3>")
    if doc.get("verdicts"):
        parts.append("<ul>" + "".join(f"<li><b>{_e(v['labels'][0])} × {_e(v['labels'][1])}</b> ({_e(v['level'])}): "
                                      f"{_e(v['text'])}</li>" for v in doc["verdicts"]) + "</ul>")
    else:
        parts.append('<p class="muted">one expert: no pair to compare</p>')
    parts.append(f'<p class="muted">Rule: {_e(doc.get("verdict_rule"))}</p>')
    ov = doc.get("overall") or {}
    if ov:
        parts.append("<h3>Experts</h3>")
        rows = []
        for i, e in enumerate(doc["experts"]):
            rows.append((e["label"], e["kind"], ov["norm"][i], ov["kept_share"][i], ov["effective_rank"][i],
                         ov["lora_rank"][i]))
        parts.append(_table(("expert", "kind", "‖τ‖₂", "share kept at the density", "effective rank (mean)",
                             "LoRA rank r (mean)"), rows))
        parts.append("<h3>Cosine similarity</h3>" + _matrix(labels, ov.get("cosine")))
        parts.append("<h3>Sign conflict at the TIES density</h3>" + _matrix(labels, ov["sign_conflict"]["density"]))
        parts.append("<h3>Sign conflict, dense (density 1.0)</h3>" + _matrix(labels, ov["sign_conflict"]["dense"]))
        parts.append("<h3>Top-k mask overlap (Jaccard)</h3>" + _matrix(labels, ov.get("mask_overlap")) +
                     "<p class='muted'>independent random masks of the same sizes would overlap:</p>" +
                     _matrix(labels, ov.get("mask_overlap_chance")))
        ae = ov.get("all_experts_conflict") or {}
        parts.append(f"<p>All-experts sign conflict: {_num(ae.get('density'))} at the density, {_num(ae.get('dense'))} dense.</p>")
    fam = doc.get("by_family") or {}
    if fam and len(labels) >= 2:
        rows = []
        for f, s in fam.items():
            rows.append((f, s["tensors"], *[s["cosine"][i][j] for i in range(len(labels)) for j in range(i + 1, len(labels))][:6],
                         *[s["sign_conflict"]["density"][i][j] for i in range(len(labels)) for j in range(i + 1, len(labels))][:6]))
        pairs = [f"{labels[i]} × {labels[j]}" for i in range(len(labels)) for j in range(i + 1, len(labels))][:6]
        parts.append("<h3>By module family</h3>" + _table(("family", "tensors", *[f"cos {p}" for p in pairs],
                                                             *[f"conflict {p}" for p in pairs]), rows))
    figures = doc.get("plots") or {}
    drawn = None
    for key, title in (("cosine_heatmap", "cosine similarity of the task vectors"),
                       ("sign_conflict_per_layer", "sign conflict per layer"),
                       ("norms_per_layer", "task-vector norm per layer"),
                       ("effective_rank_per_layer", "effective rank of ΔW per layer")):
        png = _png_file(out_dir / figures[key]) if key in figures else None
        if png is None:
            drawn = drawn if drawn is not None else plots.analysis_figures(doc)
            png = drawn.get(key)
        parts.append(_img(png, title))
    defs = doc.get("definitions") or {}
    parts.append("<h3>Definitions</h3><ul>" + "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in defs.items()) + "</ul>")
    return "\n".join(parts)


def _density_text(density: Any) -> str:
    if isinstance(density, list) and density:
        return f"{density[0]:g}" if len(set(density)) == 1 else " / ".join(f"{d:g}" for d in density)
    return str(density)


def _page(title: str, sections: list[str], status_line: str) -> str:
    ids = [m.group(1) for m in (re.match(r'<section id="([^"]+)"', s) for s in sections) if m]
    nav = "".join(f'<a href="#{i}">{i}</a>' for i in ids)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{_e(title)}</h1><p>{status_line}</p><nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body></html>\n")


# --------------------------------------------------------------------------------------------- run report
def write_html_report(out_dir: str | Path, report: dict) -> Path:
    """Write ``out_dir/report.html`` for a run's ``report`` (the report.json document); return its path."""
    out_dir = Path(out_dir)
    r = report
    status = r.get("status")
    cls = "ok" if status == "ok" else "bad"
    status_line = (f'<span class="{cls}">{_e(status)}</span> (exit {_e(r.get("exit_status"))})'
                   + (f' — {_e(r.get("error"))}' if r.get("error") else "")
                   + f' · started {_e(r.get("started_at"))} · finished {_e(r.get("finished_at"))}')
    sections = []

    summary = {"method": r.get("method"), "status": status, "partial": r.get("partial"), "architecture": r.get("architecture"),
               "device": r.get("device"), "dtype": r.get("dtype"), "seed": r.get("seed"),
               "saved": (r.get("saved") or {}).get("path") if r.get("saved") else "not saved"}
    names = ["report.json", "recipe.yml", "scores.jsonl"] + (["analysis.json"] if r.get("analysis") else [])
    files = [_link(n) for n in names if (out_dir / n).exists()]
    sections.append(_section("summary", "Summary", _kv(summary) + (f"<p>Files: {' · '.join(files)}</p>" if files else "")))

    command = " ".join(_shell_quote(a) for a in (r.get("command") or [])) or "(library call)"
    sections.append(_section("command", "Command", f"<pre>{_e(command)}</pre>"))

    models = r.get("models") or {}
    if models:
        base = models.get("base", {})
        rows = [("base", base.get("id"), "", base.get("revision"), base.get("resolved_revision"), base.get("path"))]
        for e in models.get("experts", []):
            rows.append(("expert", e.get("id"), e.get("kind"), e.get("revision"), e.get("resolved_revision"), e.get("path")))
        body = _table(("role", "model", "kind", "revision", "resolved commit", "path"), rows)
    else:
        body = '<p class="muted">not resolved (the run stopped before its preflight finished)</p>'
    sections.append(_section("models", "Models and revisions", body))

    recipe_path = out_dir / "recipe.yml"
    if recipe_path.is_file():
        body = f"<p>{_link('recipe.yml')} (reproduces this merge with <code>--recipe</code>)</p><pre>{_e(recipe_path.read_text(encoding='utf-8'))}</pre>"
    else:
        body = '<p class="muted">no recipe.yml (the run stopped before the save phase)</p>'
    if r.get("recipe"):
        body = f"<p>Input recipe: <code>{_e(r['recipe'].get('path'))}</code></p>" + body
    sections.append(_section("recipe", "Recipe", body))

    hp = r.get("hyperparameters")
    sections.append(_section("hyperparameters", "Hyperparameters", _kv(hp) if hp else '<p class="muted">none</p>'))

    phases = r.get("phases_seconds") or {}
    budget = r.get("budget") or {}
    phase_png = plots.phases_figure(phases, budget.get("seconds"))
    _save_plot(out_dir, "time_per_phase", phase_png)
    body = (_table(("phase", "seconds"), phases.items()) if phases else '<p class="muted">no phase ran</p>')
    body += _kv({"budget (s)": budget.get("seconds"), "elapsed (s)": budget.get("elapsed"),
                 "remaining (s)": budget.get("remaining")})
    body += _img(phase_png, "time per phase")
    sections.append(_section("phases", "Phases and budget", body))

    mem = {"peak RAM (MiB)": r.get("peak_rss_mib")}
    if "peak_gpu_mib" in r:
        mem["peak GPU (MiB)"] = r.get("peak_gpu_mib")
    ms = r.get("merge_stats") or {}
    for k in ("math_device", "tensors_merged", "values_merged", "seconds"):
        if k in ms:
            mem[f"merge: {k}"] = ms[k]
    sections.append(_section("memory", "Memory", _kv(mem)))

    sections.append(_section("scores", "Scores", _scores_html(r, out_dir, dataset_rows)))

    analysis_doc = _analysis_doc(r, out_dir)
    sections.append(_section("analysis", "Analysis", analysis_html(analysis_doc, out_dir)))

    preds = relative_predictions(r, out_dir)
    if preds:
        body = _table(("model", "dataset", "predictions"), ((m, d, _Raw(_link(p))) for m, d, p in preds))
        subs = [d.get("submission_path") for d in r.get("evaluation", {}).get("datasets", []) if d.get("submission_path")]
        if subs:
            body += "<p>Submission files: " + " · ".join(_link(_rel(s, out_dir)) for s in subs) + "</p>"
    else:
        body = '<p class="muted">no predictions (evaluation did not run)</p>'
    sections.append(_section("predictions", "Predictions", body))

    search = _search_html(r, out_dir)
    if search:
        sections.insert(-1, _section("search", "Search", search))

    page = _page(f"llm_merging run: {r.get('method')}", sections, status_line)
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _save_plot(out_dir: Path, name: str, png: bytes | None) -> None:
    if png:
        write_png(out_dir / "plots" / f"{name}.png", png)


def _shell_quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


def _analysis_doc(report: dict, out_dir: Path) -> dict | None:
    info = report.get("analysis")
    if not info:
        return None
    path = out_dir / (info.get("path") or "analysis.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        logger.warning("report.html: cannot read %s", path)
        return None


def _scores_html(r: dict, out_dir: Path, dataset_rows) -> str:
    ev = r.get("evaluation")
    if not ev:
        why = "evaluation was not run (--no-eval)" if r.get("status") == "ok" else "evaluation did not run"
        return f'<p class="muted">{why}</p>'
    parts = []
    metrics: list[str] = []
    for d in ev.get("datasets", []):
        for k in d.get("scores") or {}:
            if k not in metrics:
                metrics.append(k)
    rows = [(d["name"], f"{d.get('n_evaluated')}/{d.get('n_examples')}" + (" (partial)" if d.get("partial") else ""),
             *[(d.get("scores") or {}).get(m) for m in metrics]) for d in ev.get("datasets", [])]
    parts.append("<h3>Merged model</h3>" + _table(("dataset", "evaluated", *metrics), rows))
    if ev.get("average"):
        parts.append("<p>Average: " + ", ".join(f"{_e(k)} = {_num(v)}" for k, v in ev["average"].items()) + "</p>")
    bl = r.get("baselines")
    table_rows, labels = dataset_rows(r)
    if bl:
        parts.append("<h3>Baselines (main score per dataset)</h3>")
        rows = [(label, *[table_rows[ds].get(label) for ds in table_rows]) for label in labels]
        parts.append(_table(("model", *table_rows), rows))
        same = [m["label"] for m in bl.get("models", []) if m.get("same_as")]
        if same:
            parts.append(f"<p class='muted'>{_e(', '.join(same))}: the base listed among the models (same as base)</p>")
        norm = bl.get("normalised") or {}
        if norm:
            ms: list[str] = []
            for v in norm.values():
                for k in v:
                    if k not in ms:
                        ms.append(k)
            parts.append("<h3>Normalised scores</h3>" + _table(("dataset", *ms), ((ds, *[v.get(m) for m in ms]) for ds, v in norm.items())))
            parts.append(f"<p>Average normalised score: {_num(bl.get('average_normalised'))}. "
                         f"<span class='muted'>{_e(bl.get('rule'))}</span></p>")
        gain = bl.get("gain_over_base") or {}
        if gain:
            parts.append("<h3>Gain over the base</h3>" + _table(("dataset", "score"), ((ds, v.get("score")) for ds, v in gain.items())))
        if bl.get("partial"):
            parts.append('<p class="bad">baselines partial: the budget ran out</p>')
    else:
        parts.append('<p class="muted">no baselines (run with --baselines; a stopped run can end before them)</p>')
    png = plots.scores_figure(table_rows)
    _save_plot(out_dir, "scores", png)
    parts.append(_img(png, "scores: merged vs base vs experts per dataset (main metric)"))
    return "\n".join(parts)


def _search_html(r: dict, out_dir: Path) -> str:
    search_dir = out_dir / "search"
    info = r.get("search")
    if not info and not search_dir.is_dir():
        return ""
    parts = []
    if info:
        parts.append(_kv(info) if isinstance(info, dict) else f"<pre>{_e(json.dumps(info, default=str))}</pre>")
    if search_dir.is_dir():
        links = [_link(_rel(p, out_dir)) for p in sorted(search_dir.iterdir()) if p.suffix in (".csv", ".yml", ".yaml", ".json")]
        if links:
            parts.append("<p>Files: " + " · ".join(links) + "</p>")
        for png in sorted(search_dir.glob("*.png")):
            parts.append(_img(_png_file(png), png.stem.replace("_", " ")))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- analyze CLI
def write_analysis_html(out_dir: str | Path, doc: dict) -> Path:
    """``report.html`` of ``llm-merging analyze``: command, models, analysis."""
    out_dir = Path(out_dir)
    command = " ".join(_shell_quote(a) for a in doc.get("command") or [])
    sections = [_section("command", "Command", f"<pre>{_e(command)}</pre>")]
    models = doc.get("models") or {}
    rows = []
    if models:
        b = models.get("base", {})
        rows.append(("base", b.get("id"), "", b.get("revision"), b.get("resolved_revision")))
        for e in models.get("experts", []):
            rows.append(("expert", e.get("id"), e.get("kind"), e.get("revision"), e.get("resolved_revision")))
    sections.append(_section("models", "Models and revisions", _table(("role", "model", "kind", "revision", "resolved commit"), rows)))
    sections.append(_section("analysis", "Analysis", analysis_html(doc, out_dir)))
    status = '<span class="bad">partial</span>' if doc.get("partial") else '<span class="ok">complete</span>'
    page = _page("llm_merging task-vector analysis", sections, status)
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
