"""Tokenizer transplant: approximation error, time and peak memory, ours against mergekit-tokensurgeon 0.1.5.

The pair: two BPE tokenizers trained here, offline, from local text (the starter kit's data when present,
else the package's sample data): MODEL's SentencePiece-style (``▁``, byte fallback, Llama class, 32k
tokens), DONOR's GPT-2-style byte-level (GPT-2 class, up to 32k tokens), on overlapping parts of the text. Two
Llama models with hidden size 1024, fp16: MODEL untied (embeddings + LM head), DONOR tied. Their embedding
rows are correlated the way trained models' are: each token's row is a fixed random projection (one per
model) of features of its text (hashed character n-grams, after the word-start marker is made one) plus
independent noise, so shared tokens relate the two spaces as the approximations assume.

1. **Approximation error on held-out shared tokens** (the measure mergekit's approach is judged by): ``--holdout``
   shared tokens are treated as new, approximated from the remaining shared tokens, and compared with MODEL's
   true rows: mean relative L2 error ``|approx - true| / |true|`` and mean cosine similarity, per method (omp,
   common_interpolation with each weight scheme, mean), for both tools' functions on the same tensors (mergekit's
   run in its own venv as a separate process) and the seconds each took.
2. **End to end**: ``llm-merging tokensurgeon`` and ``mergekit-tokensurgeon`` on the pair (``--e2e-args``,
   default ``-k 8``: omp at k=64 over every new token takes many minutes on a small CPU for both; mergekit
   0.1.5's ``common_interpolation`` fails on fp16 models: ``expected scalar type Float but found Half``), wall
   seconds and peak RSS of each process, and the largest relative difference between their output tensors.

Run: ``python benchmarks/tokensurgeon.py [--mergekit PATH/TO/MERGEKIT-VENV]``. mergekit is found through
``--mergekit`` (alias ``--mergekit-venv``: a virtual environment or its ``mergekit-tokensurgeon``), ``$MERGEKIT_VENV``
or PATH; the held-out comparison runs mergekit's functions with the ``python`` next to that executable. Without
it only our side runs.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_util import find_mergekit, log_tail, run_measured  # noqa: E402  (benchmarks/ is sys.path[0])

from llm_merging.model.tiny import train_bpe_tokenizer
from llm_merging.model.tokensurgeon import (
    combine,
    common_interpolation,
    match_vocabularies,
    normalized_vocabulary,
    omp,
)

KIT = REPO.parent / "shared" / "data" / "starter_kit"
SAMPLE = REPO / "llm_merging" / "sample_data"

MK_SCRIPT = r"""
import json, sys, time, torch
from mergekit.tokensurgeon import batch_omp, common_interp_approximate
from mergekit.tokensurgeon.common_interpolation import DistanceMetric, WeightingScheme
d = torch.load(sys.argv[1])
res = {}
for name, method, k, scheme in json.loads(sys.argv[3]):
    t0 = time.perf_counter()
    out = []
    for s in range(0, d["targets"].shape[0], 512):
        tg = d["targets"][s:s + 512].float()
        if method == "omp":
            idx, coef = batch_omp(tg, d["atoms"].float(), k)
        elif method == "common_interpolation":
            idx, coef = common_interp_approximate(tg, d["atoms"].float(), k=k, metric=DistanceMetric.EUCLIDEAN,
                                                  weight_scheme=WeightingScheme(scheme))
        else:
            out.append(d["basis_all"].float().mean(0).expand(tg.shape[0], -1)); continue
        out.append(torch.bmm(coef.unsqueeze(1).float(), d["basis"][idx].float()).squeeze(1))
    res[name] = (torch.cat(out), time.perf_counter() - t0)
torch.save(res, sys.argv[2])
"""


# ------------------------------------------------------------------------------------------------ the pair
def corpus() -> tuple[list[str], str]:
    files = sorted(glob.glob(str(KIT / "*.json")) + glob.glob(str(KIT / "*.csv")) + glob.glob(str(KIT / "*" / "*.csv")))
    where = "starter kit"
    if not files:
        files, where = sorted(glob.glob(str(SAMPLE / "*"))), "sample data"
    lines = [line for f in files for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines, where




def text_features(tokens: list, dim: int, seed: int) -> torch.Tensor:
    """A row per normalised token: the sum of fixed random vectors of its character 1..3-grams (hashed into
    4096 buckets), normalised, plus a per-token random part: similar texts get similar rows."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(4096, dim, generator=gen)
    rows = torch.empty(len(tokens), dim)
    for i, tok in enumerate(tokens):
        text = ("\u2581" + tok[1]) if isinstance(tok, tuple) and tok[0] == "word_start" else str(tok)
        grams = [text[a:a + n] for n in (1, 2, 3) for a in range(max(1, len(text) - n + 1))]
        ids = [int.from_bytes(hashlib.md5(g.encode()).digest()[:4], "little") % 4096 for g in grams]
        v = table[ids].sum(0)
        rows[i] = v / v.norm().clamp_min(1e-6)
    own = torch.randn(len(tokens), dim, generator=gen) / dim ** 0.5
    return rows + 0.5 * own


def save_model(out: Path, tok, hidden: int, layers: int, tied: bool, embed: torch.Tensor, head: torch.Tensor | None):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=tied,
                      dtype="float16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(hidden + layers)
    state = {}
    for n, s in shapes.items():
        if n == "model.embed_tokens.weight":
            state[n] = embed.half()
        elif n == "lm_head.weight":
            if not tied:
                state[n] = head.half()
        elif n.endswith("norm.weight"):
            state[n] = torch.ones(s, dtype=torch.float16)
        else:
            state[n] = (torch.randn(s, generator=gen) * 0.02).half()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out))


def build_pair(work: Path, hidden: int, layers: int) -> tuple[Path, Path, str]:
    model, donor = work / "model", work / "donor"
    lines, where = corpus()
    if (model / "model.safetensors").is_file() and (donor / "model.safetensors").is_file():
        return model, donor, where
    for p in (model, donor):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    n = len(lines)
    mtok = train_bpe_tokenizer(model, lines[: int(n * 0.8)], 32000, byte_level=False)
    dtok = train_bpe_tokenizer(donor, lines[int(n * 0.2):], 32000, byte_level=True)
    mv, dv = normalized_vocabulary(mtok), normalized_vocabulary(dtok)
    m_tokens = [t for t, _ in sorted(mv.items(), key=lambda kv: kv[1])]
    d_tokens = [t for t, _ in sorted(dv.items(), key=lambda kv: kv[1])]
    # one latent per normalised token text, shared by both models; each model its own projection and noise
    keys = list(dict.fromkeys(m_tokens + d_tokens))
    feats = text_features(keys, hidden, seed=0)
    row = {t: i for i, t in enumerate(keys)}
    gen = torch.Generator().manual_seed(1)

    def project(tokens, seed, noise=0.3):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))
        x = feats[[row[t] for t in tokens]] @ q
        return (x + noise * torch.randn(x.shape, generator=gen) / hidden ** 0.5) * 0.05

    save_model(model, mtok, hidden, layers, False, project(m_tokens, 10), project(m_tokens, 11))
    save_model(donor, dtok, hidden, 1, True, project(d_tokens, 20), None)
    return model, donor, where


# --------------------------------------------------------------------------------------------- held-out
METHODS = [("omp k=64", "omp", 64, None), ("omp k=8", "omp", 8, None),
           ("common_interpolation k=64 distance_proportional", "common_interpolation", 64, "distance_proportional"),
           ("common_interpolation k=64 barycentric", "common_interpolation", 64, "barycentric"),
           ("common_interpolation k=64 least_squares", "common_interpolation", 64, "least_squares"),
           ("mean", "mean", 0, None)]


def ours(data: dict, method: str, k: int, scheme: str | None) -> torch.Tensor:
    out = []
    for s in range(0, data["targets"].shape[0], 512):
        tg = data["targets"][s:s + 512].float()
        if method == "mean":
            out.append(data["basis_all"].float().mean(0).expand(tg.shape[0], -1))
            continue
        if method == "omp":
            idx, coef = omp(tg, data["atoms"], k)
        else:
            idx, coef = common_interpolation(tg, data["atoms"], k, weight_scheme=scheme)
        out.append(combine(idx, coef, data["basis"]))
    return torch.cat(out)


def errors(approx: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    a, t = approx.double(), true.double()
    rel = ((a - t).norm(dim=1) / t.norm(dim=1)).mean().item()
    cos = torch.nn.functional.cosine_similarity(a, t, dim=1).mean().item()
    return rel, cos


def held_out(model: Path, donor: Path, n_holdout: int, mk_python: str | None, work: Path) -> list[dict]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    mv = normalized_vocabulary(AutoTokenizer.from_pretrained(str(model)))
    dv = normalized_vocabulary(AutoTokenizer.from_pretrained(str(donor)))
    me = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"]
    de = load_file(str(donor / "model.safetensors"))["model.embed_tokens.weight"]
    match = match_vocabularies(mv, dv, me.shape[0], de.shape[0])
    n_shared = len(match.shared_model)
    perm = torch.randperm(n_shared, generator=torch.Generator().manual_seed(0))
    hold, keep = perm[:n_holdout].sort().values, perm[n_holdout:].sort().values
    data = {"targets": de[match.shared_donor[hold]], "atoms": de[match.shared_donor[keep]],
            "basis": me[match.shared_model[keep]], "basis_all": me, "true": me[match.shared_model[hold]]}
    rows = []
    theirs = {}
    if mk_python:
        pt, res = work / "holdout.pt", work / "holdout-mk.pt"
        torch.save({k: v for k, v in data.items() if k != "true"}, pt)
        spec = json.dumps([[name, method, k, scheme] for name, method, k, scheme in METHODS])
        proc = subprocess.run([mk_python, "-c", MK_SCRIPT, str(pt), str(res), spec], capture_output=True, text=True)
        if proc.returncode != 0:
            print("mergekit held-out run failed:", proc.stderr[-1500:])
        else:
            theirs = torch.load(res)
    for name, method, k, scheme in METHODS:
        t0 = time.perf_counter()
        approx = ours(data, method, k, scheme)
        secs = time.perf_counter() - t0
        rel, cos = errors(approx, data["true"])
        row = {"method": name, "ours_rel_err": rel, "ours_cos": cos, "ours_s": secs}
        if name in theirs:
            mk, mk_s = theirs[name]
            row.update(mk_rel_err=errors(mk, data["true"])[0], mk_cos=errors(mk, data["true"])[1], mk_s=mk_s,
                       max_row_diff=((approx.double() - mk.double()).norm(dim=1)
                                     / mk.double().norm(dim=1).clamp_min(1e-12)).max().item())
        rows.append(row)
    return rows, n_shared


# --------------------------------------------------------------------------------------------- end to end
def timed(cmd: list[str], log: Path) -> tuple[float, float, int, str]:
    """Run ``cmd`` in a fresh process (output to ``log``): (wall s, its peak RSS MiB, exit status, log tail)."""
    m = run_measured(cmd, log=log, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return m.wall_s, m.peak_rss_mib, m.returncode, log_tail(log) if m.returncode else ""


def max_rel_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    worst = 0.0
    for n in x:
        if n in y and x[n].shape == y[n].shape:
            worst = max(worst, float((x[n].double() - y[n].double()).norm() / y[n].double().norm().clamp_min(1e-12)))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "llm-merging-tokensurgeon-bench"),
                    help="where the pair is built (kept and reused) and outputs written")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--holdout", type=int, default=512, help="shared tokens held out (default 512)")
    ap.add_argument("--e2e-args", default="-k 8",
                    help="options of both end-to-end runs (default: '-k 8', omp; omp at k=64 over every new token "
                         "takes many minutes on a small CPU: its time is the held-out one times new/held-out tokens)")
    ap.add_argument("--mergekit", "--mergekit-venv", dest="mergekit", default=None,
                    help="mergekit venv or its mergekit-tokensurgeon (default: $MERGEKIT_VENV, then PATH)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, donor, where = build_pair(work, args.hidden, args.layers)
    mk_cli = find_mergekit("mergekit-tokensurgeon", args.mergekit)
    mk_python = next((str(p) for p in [Path(mk_cli).parent / "python"] if p.is_file()), None) if mk_cli else None

    from transformers import AutoTokenizer

    nm, nd = len(AutoTokenizer.from_pretrained(str(model))), len(AutoTokenizer.from_pretrained(str(donor)))
    rows, n_shared = held_out(model, donor, args.holdout, mk_python, work)
    print(f"pair: MODEL {nm} tokens (SentencePiece-style BPE), DONOR {nd} tokens (byte-level BPE), {n_shared} shared "
          f"(text: {where}); hidden {args.hidden}, fp16; {args.holdout} shared tokens held out")
    print(f"{'method':50s} {'ours rel.err':>12s} {'cos':>6s} {'s':>6s} | {'mergekit rel.err':>16s} {'cos':>6s} "
          f"{'s':>6s} | max row diff")
    for r in rows:
        mk = (f"{r['mk_rel_err']:16.4f} {r['mk_cos']:6.4f} {r['mk_s']:6.1f} | {r['max_row_diff']:.1e}"
              if "mk_rel_err" in r else f"{'-':>16s} {'-':>6s} {'-':>6s} | -")
        print(f"{r['method']:50s} {r['ours_rel_err']:12.4f} {r['ours_cos']:6.4f} {r['ours_s']:6.1f} | {mk}")

    extra = args.e2e_args.split()
    ours_out, mk_out = work / "out-ours", work / "out-mergekit"
    for p in (ours_out, mk_out):
        shutil.rmtree(p, ignore_errors=True)
    print(f"end to end ({' '.join(extra)}):")
    wall, rss, rc, err = timed([sys.executable, str(REPO / "llm_merging" / "main.py"), "tokensurgeon", str(model),
                                str(donor), str(ours_out), "-q", *extra], work / "ours.log")
    print(f"  llm-merging tokensurgeon   {wall:7.1f} s  peak RSS {rss:7.0f} MiB" + ("" if rc == 0 else f"  FAILED {err}"))
    if mk_cli:
        wall, rss, rc, err = timed([mk_cli, str(model), str(donor), str(mk_out), *extra], work / "mergekit.log")
        print(f"  mergekit-tokensurgeon      {wall:7.1f} s  peak RSS {rss:7.0f} MiB" + ("" if rc == 0 else f"  FAILED {err}"))
        if rc == 0 and ours_out.is_dir():
            print(f"  largest relative difference of an output tensor: {max_rel_diff(ours_out, mk_out):.1e}")
    else:
        print("  mergekit-tokensurgeon not found: skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
