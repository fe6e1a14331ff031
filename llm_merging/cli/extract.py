"""``llm-merging extract-lora --base-model B --model FT --out DIR (--rank R | --energy E)``: a full fine-tune
written as a PEFT LoRA adapter of its base (see docs/adapters.md)."""
from __future__ import annotations

from typing import Sequence

from llm_merging.cli import Parser, add_output_flags, guarded, setup_logging
from llm_merging.model.extract import FACTOR_DTYPES, extract_lora
from llm_merging.model.save import EMBEDDING_MODES, EXTRACT_REPORT


def build_parser() -> Parser:
    p = Parser(prog="llm-merging extract-lora",
               description="Extract a PEFT LoRA adapter from a full fine-tune: ΔW = model − base, tensor by tensor, "
                           "truncated SVD per Linear/Conv1D matrix (fixed rank or energy rule), embeddings, norms "
                           f"and biases kept exactly; writes the adapter, {EXTRACT_REPORT} and a model card.")
    p.add_argument("--base-model", dest="base_model", required=True, help="base model: local directory or hub id[@revision]")
    p.add_argument("--model", required=True, help="the full fine-tune of the base: local directory or hub id[@revision]")
    p.add_argument("--out", required=True, help="adapter directory to write (new, or an empty directory)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="rank of every LoRA matrix (capped at a matrix's min(out, in))")
    how.add_argument("--energy", type=float,
                     help="per matrix, the smallest rank keeping this fraction of ‖ΔW‖_F² (0 < E ≤ 1)")
    p.add_argument("--max-rank", dest="max_rank", type=int, help="with --energy: the largest rank of any matrix")
    p.add_argument("--embeddings", choices=EMBEDDING_MODES, default="keep",
                   help="input embedding and output head: keep (exactly, modules_to_save; default) or low-rank")
    p.add_argument("--svd", choices=("auto", "full", "randomized"), default="auto",
                   help="SVD: auto (randomized when the rank is far below the size; default), full or randomized")
    p.add_argument("--device", help="where to compute: auto, cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--dtype", choices=tuple(FACTOR_DTYPES), default="float32",
                   help="dtype of the saved LoRA factors (default float32)")
    add_output_flags(p)
    return p


def main(argv: Sequence[str]) -> int:
    """0 on success, 2 on a user error (one line), 1 on an internal error."""
    args = build_parser().parse_args(list(argv))
    setup_logging(args.quiet, args.debug)

    def work() -> int:
        report = extract_lora(args.base_model, args.model, args.out, rank=args.rank, energy=args.energy,
                              max_rank=args.max_rank, embeddings=args.embeddings, svd=args.svd, device=args.device,
                              dtype=args.dtype, progress=not args.quiet,
                              command=["llm-merging", "extract-lora", *argv])
        t = report["totals"]
        print(f"adapter: {report['out']} ({t['lora_modules']} LoRA modules, rank {t['rank_min']}–{t['rank_max']}; "
              f"{t['modules_to_save']} kept whole, {t['biases']} biases) in {report['seconds']:.1f} s on {report['device']}")
        print(f"  relative error of ΔW: {t['relative_error']:.4g} overall, {t['max_relative_error']:.4g} at worst "
              f"({t['worst_module']})")
        print(f"  per module: {report['out']}/{EXTRACT_REPORT}")
        return 0

    return guarded(work, debug=args.debug)
