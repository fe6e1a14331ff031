"""``llm-merging tokensurgeon MODEL DONOR OUT``: MODEL with DONOR's tokenizer, its embedding rows re-indexed to
DONOR's vocabulary and the rows of tokens only DONOR has approximated from the shared ones (mergekit's
``mergekit-tokensurgeon``; see `llm_merging.model.tokensurgeon`)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from llm_merging.cli import Parser, add_output_flags, guarded, setup_logging
from llm_merging.core.devices import check_device
from llm_merging.model.tokensurgeon import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_K,
    MATCH_SCOPES,
    METHODS,
    SUBWORD_METHODS,
    WEIGHT_SCHEMES,
    Options,
    plan_transplant,
    transplant,
)


def build_parser() -> Parser:
    p = Parser(prog="llm-merging tokensurgeon",
               description="Transplant DONOR's tokenizer onto MODEL: rows of tokens both have are kept exactly, rows "
                           "of tokens only DONOR has are approximated from the shared tokens; writes OUT (a new or "
                           "empty directory) as a Hugging Face model directory.")
    p.add_argument("model", metavar="MODEL", help="the model to re-tokenize: local directory or hub id (cached)")
    p.add_argument("donor", metavar="DONOR",
                   help="the model whose tokenizer OUT gets (its weights are read by omp and common_interpolation)")
    p.add_argument("out", metavar="OUT", help="output directory (must be new or empty)")
    p.add_argument("-a", "--approximation-method", dest="method", default="omp", choices=METHODS,
                   help="how rows of new tokens are approximated (default: omp)")
    p.add_argument("-k", "--k", dest="k", type=int, default=DEFAULT_K,
                   help=f"shared tokens each new row is built from (omp, common_interpolation; default {DEFAULT_K})")
    p.add_argument("-c", "--cosine-similarity", dest="cosine", action=argparse.BooleanOptionalAction, default=False,
                   help="common_interpolation: nearest tokens by cosine similarity instead of Euclidean distance")
    p.add_argument("-w", "--weight-scheme", dest="weight_scheme", default="distance_proportional",
                   choices=WEIGHT_SCHEMES, help="common_interpolation: weights of the k tokens "
                                                "(default: distance_proportional)")
    p.add_argument("-s", "--subword-method", dest="subword_method", default="mean", choices=SUBWORD_METHODS,
                   help="subword: how the rows of a token's pieces combine (default: mean)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"new tokens approximated at a time (default {DEFAULT_BATCH_SIZE}; 0 or less: all at once)")
    p.add_argument("-pm", "--prefix-match", dest="prefix_match", default="no", choices=MATCH_SCOPES,
                   help="a new token takes the row of its longest prefix MODEL has: no, yes, embed (input "
                        "embeddings only) or lm_head (default: no)")
    p.add_argument("-bm", "--byte-match", dest="byte_match", default="no", choices=MATCH_SCOPES,
                   help="a one-character token matches a <0xNN> byte token and back: no, yes, embed or lm_head "
                        "(default: no)")
    p.add_argument("-nvs", "--new-vocab-scale", dest="new_vocab_scale", type=float, default=None,
                   help="multiply the approximated rows by this factor")
    p.add_argument("--device", default="auto",
                   help="where approximations are computed: auto, cpu, cuda, cuda:N "
                        "(default: the GPU when there is one)")
    add_output_flags(p)
    return p


def main(argv: Sequence[str]) -> int:
    """0 on success, 2 on a user error (one line), 1 on an internal error."""
    args = build_parser().parse_args(list(argv))
    setup_logging(args.quiet, args.debug)

    def work() -> int:
        device = check_device(args.device)  # auto: the GPU when there is one (Options.torch_device)
        options = Options(method=args.method, k=args.k, cosine_similarity=args.cosine,
                          weight_scheme=args.weight_scheme, subword_method=args.subword_method,
                          batch_size=args.batch_size, prefix_match=args.prefix_match, byte_match=args.byte_match,
                          new_vocab_scale=args.new_vocab_scale, device=device)
        plan = plan_transplant(args.model, args.donor, args.out, options)
        report = transplant(args.model, args.donor, args.out, options, progress=not args.quiet, plan=plan)
        print(f"{args.out}: {args.model} with the tokenizer of {args.donor} ({report['rows']} rows, "
              f"{report['method']}, {report['seconds']:.1f} s)")
        for name, counts in report["matrices"].items():
            print(f"  {name}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v))
        return 0

    return guarded(work, debug=args.debug)
