"""``llm-merging analyze --base-model REF --models REF ...``: task-vector analysis of experts against their
base (norms, cosines, sign conflicts, mask overlap, effective rank, verdicts) without merging."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from llm_merging.cli import Parser, add_output_flags, guarded, setup_logging
from llm_merging.core.devices import check_device
from llm_merging.core.io import check_output_folder
from llm_merging.insight.analysis import analyze_method, parse_density, summary_lines, write_analysis
from llm_merging.merging.base import TaskVectorMerge
from llm_merging.report.html import write_analysis_html


def build_parser() -> Parser:
    p = Parser(prog="llm-merging analyze",
               description="Task-vector analysis of expert models against their base: norms, cosine similarity, "
                           "sign conflicts, top-k mask overlap, LoRA effective rank, verdicts; writes "
                           "OUTPUT_FOLDER/analysis/analysis.json, plots and report.html.")
    p.add_argument("--base-model", dest="base_model", required=True, help="base model: local directory or hub id[@revision]")
    p.add_argument("--models", nargs="+", required=True, help="expert adapters / models: local directories or hub ids[@revision]")
    p.add_argument("--density", default=None,
                   help="TIES density of the trimmed figures, one value or one per model (e.g. 0.2 or 0.3,0.2; default 0.2)")
    p.add_argument("--output_folder", default="output", help="outputs go to OUTPUT_FOLDER/analysis/ (default: output)")
    p.add_argument("--device", help="where to compute: cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--full-rank", dest="full_rank", action="store_true",
                   help="also the effective rank of full fine-tunes' task-vector matrices (one SVD per matrix: slow)")
    add_output_flags(p)
    return p


def main(argv: Sequence[str]) -> int:
    """0 on success, 2 on a user error (one line), 1 on an internal error."""
    args = build_parser().parse_args(list(argv))
    setup_logging(args.quiet, args.debug)

    def work() -> int:
        density = parse_density(args.density, len(args.models))
        device = check_device(args.device) if args.device else None
        method = TaskVectorMerge("analyze")
        method.base_model_name, method.base_model_revision_id = args.base_model, None
        method.list_models = list(args.models)
        method.is_peft = None
        method.progress = not args.quiet
        models = method.preflight()  # every reference resolved and checked before any tensor is read
        out_dir = Path(args.output_folder) / "analysis"
        check_output_folder(out_dir)
        doc = analyze_method(method, density=density, device=None if device in (None, "auto") else device,
                             full_rank=args.full_rank, progress=not args.quiet)
        doc["models"] = models
        doc["command"] = ["llm-merging", "analyze", *argv]
        written = write_analysis(doc, out_dir)
        html = write_analysis_html(out_dir, doc)
        print(f"analysis of {len(doc['experts'])} expert(s), {doc['tensors_analyzed']} tensors, {doc['seconds']:.1f} s")
        for line in summary_lines(doc):
            print(line)
        print(f"  analysis: {written['analysis.json']}")
        print(f"  report:   {html}")
        return 0

    return guarded(work, debug=args.debug)
