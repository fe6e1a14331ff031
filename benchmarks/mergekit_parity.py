"""Parity with mergekit 0.1.5: the same YAML recipe through ``mergekit-yaml`` and through ``--recipe``.

Builds (once, cached under ``--workdir``) an fp32 Llama-shaped base, three full fine-tunes of it whose task
vectors share a per-tensor common direction with random signs (so cosines, sign conflicts and model-stock
ratios, negative ones included, are non-trivial) and one PEFT LoRA adapter; the default shape reuses the
tiny offline base and LoRA expert of ``llm_merging.model.tiny`` (hidden 64, 2 layers). Then writes one recipe per
case — every deterministic mergekit method we map (linear, task_arithmetic, ties, breadcrumbs,
breadcrumbs_ties, slerp, model_stock), the recipe features (per-layer gradients, filter lists, per-model
parameters, slices, a ``BASE+LORA`` model) and merges without a ``base_model`` (linear, karcher, nuslerp,
multislerp, passthrough: the first model is the template) — runs ``mergekit-yaml RECIPE OUT`` and
``python llm_merging/main.py --recipe RECIPE --output_folder OUT --no-eval`` on it, each in a fresh process,
and prints per recipe the largest relative difference over tensors,
``max_tensors ‖ours − theirs‖∞ / max(‖theirs‖∞, 1e-12)``, with PASS/FAIL against 1e-5.

Chained recipes (several merges in one file, each with a ``name`` that later merges read; mergekit-multi's
format) run through ``mergekit-multi RECIPE --intermediate-dir DIR --out-path OUT`` (next to mergekit-yaml)
and through the same ``--recipe``, and are compared the same way on the final merge.

Random methods (dare_linear, dare_ties, della, della_linear) are seeded on both sides, but the two draw
their masks from different generators: their line is "statistical", comparing each tensor's merged task
vector δ = θ − θ₀ in distribution — the relative difference of its L2 norm and of its mean (in units of its
RMS), median and max over tensors — and is never a pass/fail.

Usage::

    python benchmarks/mergekit_parity.py                       # tiny shape (hidden 64, 2 layers)
    python benchmarks/mergekit_parity.py --hidden 256 --layers 4 --vocab 4096
    python benchmarks/mergekit_parity.py --mergekit PATH/TO/MERGEKIT-VENV --only ties slerp

mergekit-yaml is found through ``--mergekit`` (a virtual environment or its ``mergekit-yaml``), else in the virtual
environment ``$MERGEKIT_VENV``, else on PATH (mergekit-multi next to it); without it
the script says so and exits 0. mergekit is never imported here (it runs as a command). Exit status 1 when a
deterministic recipe FAILs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_util import find_mergekit, log_tail, run_measured  # noqa: E402  (benchmarks/ is on sys.path)

TOLERANCE = 1e-5
TINY_SHAPE = (64, 2, None)  # hidden, layers, vocab (None: the tiny tokenizer's)


# --------------------------------------------------------------------------------------------- models
def _correlated_experts(base_dir: Path, out_dirs: list[Path], seed: int = 7) -> None:
    """Full fine-tunes θᵢ = θ₀ + 0.01·(sᵢ·c + nᵢ) per tensor: c a common direction, sᵢ ~ N(0, 1) per tensor and
    expert (so signs agree on some tensors and conflict on others), nᵢ independent noise. fp32."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    gen = torch.Generator().manual_seed(seed)
    experts: list[dict] = [{} for _ in out_dirs]
    for name in sorted(tensors):
        base = tensors[name].to(torch.float32)
        common = torch.randn(base.shape, generator=gen)
        signs = torch.randn(len(out_dirs), generator=gen)
        for i in range(len(out_dirs)):
            noise = torch.randn(base.shape, generator=gen)
            experts[i][name] = _distinct_magnitudes(base + 0.01 * (signs[i] * common + noise), base)
    for out, state in zip(out_dirs, experts):
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out)


def _distinct_magnitudes(theta, base):
    """θ nudged by single ulps until every |θ − θ₀| (as fp32 subtraction gives it, in both tools) is distinct.

    Top-k selections then have no ties at their thresholds. Ties are where the two tools legitimately
    differ: we keep the lowest flat indices, mergekit whatever ``torch.argsort``/``torch.sort`` return
    (not a stable order on large tensors), so exact equal magnitudes at a threshold, common in fp16 and rare
    but possible in fp32 (the 2 048-entry tiny q/k/v projections hit one), are excluded from the check.
    """
    import torch

    theta = theta.to(torch.float32).contiguous()
    flat = theta.view(-1)
    gen = torch.Generator().manual_seed(99)
    for _ in range(100):
        mags = (theta - base).abs().view(-1)
        values, order = torch.sort(mags, stable=True)
        dup = values[1:] == values[:-1]
        if not bool(dup.any()):
            return theta
        bad = order[1:][dup]
        # a step of about 2^-18 of the magnitude (many ulps of θ, so fp32 rounding of θ − θ₀ cannot undo it)
        ulp = (torch.nextafter(flat[bad], torch.full_like(flat[bad], float("inf"))) - flat[bad]).abs()
        step = torch.maximum(mags[bad] * 2.0 ** -18, 8 * ulp) * torch.rand(bad.numel(), generator=gen).add_(1.0)
        flat[bad] += step
    raise RuntimeError("could not make the task-vector magnitudes distinct")


def _random_base(out: Path, hidden: int, layers: int, vocab: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_merging.model.tiny import build_tokenizer

    heads = max(1, hidden // 32)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    model.save_pretrained(str(tmp))
    build_tokenizer(tmp)
    os.replace(tmp, out)


def _lora(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp))
    os.replace(tmp, out)


def build_models(workdir: Path, hidden: int, layers: int, vocab: int | None) -> dict:
    """Paths of the base, the 3 full experts and the LoRA adapter (built on first use)."""
    from llm_merging.model import tiny

    if (hidden, layers, vocab) == TINY_SHAPE:
        base, lora = tiny.base_dir("decoder"), tiny.lora_expert_dir("decoder", 0)
        root = workdir / "models-tiny"
    else:
        root = workdir / f"models-h{hidden}-l{layers}-v{vocab}"
        base, lora = root / "base", root / "lora"
        if not base.exists():
            root.mkdir(parents=True, exist_ok=True)
            _random_base(base, hidden, layers, vocab or 1024)
        if not lora.exists():
            _lora(base, lora)
    experts = [root / f"expert{i}" for i in range(3)]
    if not all(e.exists() for e in experts):
        root.mkdir(parents=True, exist_ok=True)
        _correlated_experts(Path(base), experts)
    return {"base": str(base), "experts": [str(e) for e in experts], "lora": str(lora)}


# -------------------------------------------------------------------------------------------- recipes
def recipes(m: dict, layers: int) -> dict[str, tuple[dict, bool]]:
    """name -> (recipe document, deterministic)."""
    b, (e0, e1, e2), lora = m["base"], m["experts"], m["lora"]
    half = max(1, layers // 2)
    grad = [0.2, 0.9, 0.5]  # a gradient over depth (non-uniform, interpolated)
    filt = [{"filter": "self_attn", "value": [0.3, 0.8]}, {"filter": "mlp", "value": 0.6}, {"value": 0.45}]
    out: dict[str, tuple[dict, bool]] = {}

    def add(name: str, doc: dict, deterministic: bool = True) -> None:
        out[name] = ({**doc, "dtype": "float32"}, deterministic)

    three = lambda params: [{"model": e, "parameters": p} for e, p in zip((e0, e1, e2), params)]  # noqa: E731
    add("linear", {"merge_method": "linear", "base_model": b,
                   "models": [{"model": b, "parameters": {"weight": 0.5}},
                              *three([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.3}])]})
    add("linear_base_added", {"merge_method": "linear", "base_model": b, "parameters": {"weight": 0.7},
                              "models": three([{"weight": 1.0}, {"weight": 0.6}, {"weight": 0.3}])})
    add("linear_unnormalized_gradient_filter", {
        "merge_method": "linear", "base_model": b, "parameters": {"normalize": False},
        "models": [{"model": b, "parameters": {"weight": 0.2}},
                   *three([{"weight": grad}, {"weight": filt}, {"weight": 0.25}])]})
    add("task_arithmetic", {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.8},
                            "models": three([{"weight": 1.0}, {"weight": 0.6}, {"weight": -0.3}])})
    add("task_arithmetic_normalize", {"merge_method": "task_arithmetic", "base_model": b,
                                      "parameters": {"normalize": True, "lambda": 1.2},
                                      "models": [{"model": b}, *three([{"weight": 0.7}, {"weight": 0.5}, {"weight": 0.4}])]})
    add("ties", {"merge_method": "ties", "base_model": b,
                 "models": three([{"weight": 0.7, "density": 0.35}, {"weight": 0.4, "density": 0.6},
                                  {"weight": 0.5, "density": 0.27}])})
    add("ties_unnormalized_lambda", {"merge_method": "ties", "base_model": b,
                                     "parameters": {"normalize": False, "lambda": 0.9, "density": 0.41, "int8_mask": True},
                                     "models": three([{"weight": 0.7}, {"weight": 0.4}, {"weight": 0.5}])})
    add("ties_gradient_filter", {"merge_method": "ties", "base_model": b,
                                 "parameters": {"density": [{"filter": "self_attn", "value": grad}, {"value": 0.33}],
                                                "weight": 0.5},
                                 "models": [{"model": b}, *three([{"weight": filt}, {}, {"density": [0.7, 0.15]}])]})
    add("breadcrumbs", {"merge_method": "breadcrumbs", "base_model": b,
                        "models": three([{"weight": 0.7, "density": 0.83, "gamma": 0.037},
                                         {"weight": 0.5, "density": 0.61, "gamma": 0.011},
                                         {"weight": 0.3, "density": 0.9}])})
    add("breadcrumbs_normalize", {"merge_method": "breadcrumbs", "base_model": b,
                                  "parameters": {"normalize": True, "density": 0.77, "gamma": [0.01, 0.05]},
                                  "models": three([{"weight": 0.7}, {"weight": 0.5}, {"weight": 0.3}])})
    add("breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "parameters": {"density": 0.73, "gamma": 0.023},
                             "models": three([{"weight": 0.7}, {"weight": 0.5, "density": 0.52}, {"weight": 0.3}])})
    add("breadcrumbs_ties_normalize", {"merge_method": "breadcrumbs_ties", "base_model": b,
                                       "parameters": {"density": 0.73, "gamma": 0.023, "normalize": True},
                                       "models": three([{"weight": 0.7}, {"weight": 0.5}, {"weight": 0.3}])})
    add("slerp", {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.35},
                  "models": [{"model": b}, {"model": e0}]})
    add("slerp_base_listed_last_gradient_filter", {
        "merge_method": "slerp", "base_model": b,
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "models": [{"model": e1}, {"model": b}]})
    add("slerp_slices", {
        "merge_method": "slerp", "base_model": b,
        "slices": [{"sources": [{"model": b, "layer_range": [0, layers]}, {"model": e2, "layer_range": [0, layers]}]}],
        "parameters": {"t": [0.1, 0.9]}})
    add("model_stock", {"merge_method": "model_stock", "base_model": b, "models": [{"model": e} for e in (e0, e1, e2)]})
    add("model_stock_filter_wise", {"merge_method": "model_stock", "base_model": b, "parameters": {"filter_wise": True},
                                    "models": [{"model": b}, *[{"model": e} for e in (e0, e1, e2)]]})
    if layers >= 2:
        add("ties_slices", {
            "merge_method": "ties", "base_model": b, "parameters": {"weight": 0.5, "density": 0.5},
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, half]},
                             {"model": e0, "layer_range": [0, half], "parameters": {"density": 0.3}},
                             {"model": e1, "layer_range": [0, half]}],
                 "parameters": {"weight": [0.9, 0.2]}},
                {"sources": [{"model": b, "layer_range": [half, layers]},
                             {"model": e0, "layer_range": [half, layers]},
                             {"model": e1, "layer_range": [half, layers], "parameters": {"weight": 0.8}}],
                 "parameters": {"density": 0.45}},
            ]})
        add("task_arithmetic_slices", {
            "merge_method": "task_arithmetic", "base_model": b,
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, half]},
                             {"model": e0, "layer_range": [0, half], "parameters": {"weight": grad}},
                             {"model": e2, "layer_range": [0, half], "parameters": {"weight": 0.4}}],
                 "parameters": {"lambda": 0.7}},
                {"sources": [{"model": b, "layer_range": [half, layers]},
                             {"model": e0, "layer_range": [half, layers], "parameters": {"weight": 0.3}},
                             {"model": e2, "layer_range": [half, layers], "parameters": {"weight": filt}}]},
            ]})
    add("task_arithmetic_lora", {"merge_method": "task_arithmetic", "base_model": b,
                                 "models": [{"model": e0, "parameters": {"weight": 0.6}},
                                            {"model": f"{b}+{lora}", "parameters": {"weight": 0.8}}]})
    add("ties_lora", {"merge_method": "ties", "base_model": b,
                      "models": [{"model": e1, "parameters": {"weight": 0.6, "density": 0.45}},
                                 {"model": f"{b}+{lora}", "parameters": {"weight": 0.8, "density": 0.3}}]})
    # Merges without a base model (the first model is the output's template; the models' own weights merge).
    add("linear_no_base_gradient_filter", {
        "merge_method": "linear",
        "models": three([{"weight": [{"filter": "mlp", "value": grad}, {"value": 0.7}]}, {"weight": filt},
                         {"weight": 0.25}])})
    add("linear_no_base_unnormalized", {"merge_method": "linear", "parameters": {"normalize": False},
                                        "models": three([{"weight": 0.5}, {"weight": [0.1, 0.4]}, {"weight": 0.3}])})
    add("karcher_no_base", {"merge_method": "karcher", "models": [{"model": e} for e in (e0, e1, e2)]})
    add("karcher_no_base_iterations", {"merge_method": "karcher", "parameters": {"max_iter": 3, "tol": 1e-7},
                                       "models": [{"model": e} for e in (e1, e2)]})
    add("nuslerp_no_base", {"merge_method": "nuslerp",
                            "models": [{"model": e0, "parameters": {"weight": 0.3}},
                                       {"model": e1, "parameters": {"weight": [0.9, 0.2]}}]})
    add("nuslerp_no_base_rows", {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                 "models": [{"model": e2, "parameters": {"weight": 0.6}},
                                            {"model": e0, "parameters": {"weight": filt}}]})
    add("nuslerp_no_base_columns", {"merge_method": "nuslerp",
                                    "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                                    "models": [{"model": e1, "parameters": {"weight": 0.45}},
                                               {"model": e2, "parameters": {"weight": 0.55}}]})
    add("multislerp_no_base", {"merge_method": "multislerp",
                               "models": three([{"weight": 1.0}, {"weight": grad}, {"weight": filt}])})
    add("multislerp_no_base_unnormalized", {"merge_method": "multislerp", "parameters": {"normalize_weights": False},
                                            "models": three([{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.4}])})
    if layers >= 2:
        add("passthrough_no_base_slices", {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": e0, "layer_range": [0, half]}]},
                       {"sources": [{"model": e1, "layer_range": [half, layers]}]}]})
    # Random methods: statistical comparison only.
    rnd = three([{"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.6}, {"weight": 0.4, "density": 0.4}])
    add("dare_linear", {"merge_method": "dare_linear", "base_model": b, "models": rnd}, False)
    add("dare_ties", {"merge_method": "dare_ties", "base_model": b, "models": rnd}, False)
    add("della", {"merge_method": "della", "base_model": b, "parameters": {"epsilon": 0.1}, "models": rnd}, False)
    add("della_linear", {"merge_method": "della_linear", "base_model": b, "parameters": {"epsilon": 0.1, "lambda": 0.9},
                         "models": rnd}, False)
    return out


def chained_recipes(m: dict, layers: int) -> dict[str, tuple[list[dict], bool]]:
    """Chained merges (mergekit-multi's multi-document recipes): name -> (documents, deterministic). Each
    named merge is read by a later one by its name; the document without a name is the final merge."""
    b, (e0, e1, e2), lora = m["base"], m["experts"], m["lora"]
    grad = [0.2, 0.9, 0.5]
    out: dict[str, tuple[list[dict], bool]] = {}
    # a merge of two experts, then TIES of it with a third, then SLERP between the two merges (written final first)
    out["chain_ta_ties_slerp"] = ([
        {"merge_method": "slerp", "base_model": "soup", "parameters": {"t": [0.2, 0.7]},
         "models": [{"model": "soup"}, {"model": "trimmed"}], "dtype": "float32"},
        {"name": "soup", "merge_method": "task_arithmetic", "base_model": b, "dtype": "float32",
         "models": [{"model": e0, "parameters": {"weight": 0.6}}, {"model": e1, "parameters": {"weight": 0.4}}]},
        {"name": "trimmed", "merge_method": "ties", "base_model": b, "dtype": "float32",
         "models": [{"model": "soup", "parameters": {"weight": 0.5, "density": 0.7}},
                    {"model": e2, "parameters": {"weight": 0.5, "density": grad}}]},
    ], True)
    # a soup without a base model, then a LoRA applied to it (NAME+LORA) merged over it as the base; all named
    out["chain_lora_on_a_merge"] = ([
        {"name": "mix", "merge_method": "linear", "dtype": "float32",
         "models": [{"model": e1, "parameters": {"weight": 0.3}}, {"model": e2, "parameters": {"weight": 0.7}}]},
        {"name": "top", "merge_method": "task_arithmetic", "base_model": "mix", "dtype": "float32",
         "models": [{"model": f"mix+{lora}", "parameters": {"weight": 0.8}},
                    {"model": e0, "parameters": {"weight": 0.5}}]},
    ], True)
    return out


# ---------------------------------------------------------------------------------------------- runs
def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Wall seconds of ``cmd`` in a fresh process (output to ``log``); RuntimeError when it fails."""
    rc, seconds, _ = run_measured(cmd, env=env, cwd=ROOT, log=log)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({rc}); see {log}:\n  {log_tail(log, 5)}")
    return seconds


def _load(dirpath: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(dirpath.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise RuntimeError(f"no safetensors in {dirpath}")
    return out


def compare(ours: dict, theirs: dict) -> tuple[float, str]:
    """Largest relative difference over tensors: ‖ours − theirs‖∞ / max(‖theirs‖∞, 1e-12)."""
    missing = sorted(set(theirs) ^ set(ours))
    if missing:
        raise RuntimeError(f"tensor names differ: {missing[:5]}")
    worst, where = 0.0, ""
    for name, t in theirs.items():
        o = ours[name]
        if o.shape != t.shape:
            raise RuntimeError(f"{name}: shape {tuple(o.shape)} vs mergekit {tuple(t.shape)}")
        t32, o32 = t.float(), o.float()
        rel = float((o32 - t32).abs().max()) / max(float(t32.abs().max()), 1e-12)
        if not math.isfinite(rel) or rel > worst:
            worst, where = rel, name
    return worst, where


def statistical(ours: dict, theirs: dict, base: dict) -> dict:
    """Per tensor on δ = θ − θ₀: relative L2-norm difference, mean difference in RMS units; median and max."""
    import statistics

    norms, means = [], []
    for name, t in theirs.items():
        dt, do = t.double() - base[name].double(), ours[name].double() - base[name].double()
        nt = float(dt.norm())
        if nt == 0.0:
            continue
        rms = nt / math.sqrt(dt.numel())
        norms.append(abs(float(do.norm()) - nt) / nt)
        means.append(abs(float(do.mean()) - float(dt.mean())) / rms)
    return {"norm_med": statistics.median(norms), "norm_max": max(norms),
            "mean_med": statistics.median(means), "mean_max": max(means)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=TINY_SHAPE[0])
    p.add_argument("--layers", type=int, default=TINY_SHAPE[1])
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tiny tokenizer's)")
    p.add_argument("--mergekit", default=None, help="mergekit venv or its mergekit-yaml (default: $MERGEKIT_VENV/bin/mergekit-yaml, else on PATH)")
    p.add_argument("--workdir", default=os.environ.get("LLM_MERGING_PARITY_DIR", "/tmp/llm_merging_mergekit_parity"))
    p.add_argument("--only", nargs="*", default=None, help="recipe names (substring match)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random methods (both sides)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    mergekit = find_mergekit("mergekit-yaml", args.mergekit)
    if mergekit is None:
        print(f"mergekit-yaml not found ({args.mergekit or '$MERGEKIT_VENV, PATH'}): skipping the parity check. "
              "Install mergekit 0.1.5 in its own virtual environment and pass --mergekit PATH.")
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shape = (args.hidden, args.layers, args.vocab)
    print(f"building models (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab or 'tiny'}, fp32) ...", flush=True)
    models = build_models(workdir, *shape)
    tag = "tiny" if shape == TINY_SHAPE else f"h{args.hidden}-l{args.layers}-v{args.vocab}"
    runs = workdir / f"runs-{tag}"
    base_tensors = _load(Path(models["base"]))

    import yaml

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results, failed = [], 0
    print(f"mergekit: {mergekit}\n")
    print(f"{'recipe':44s} {'method':18s} {'max rel diff':>13s}  result   (worst tensor)")
    for name, (doc, deterministic) in {**recipes(models, args.layers), **chained_recipes(models, args.layers)}.items():
        if args.only and not any(o in name for o in args.only):
            continue
        d = runs / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        recipe = d / "recipe.yml"
        if isinstance(doc, list):  # a chained recipe: one YAML document per merge, through mergekit-multi
            recipe.write_text(yaml.safe_dump_all(doc, sort_keys=False))
            command = [str(Path(mergekit).with_name("mergekit-multi")), str(recipe), "--intermediate-dir",
                       str((d / "mk_intermediates").resolve()), "--out-path", str((d / "mergekit").resolve())]
        else:
            recipe.write_text(yaml.safe_dump({**doc, **({} if deterministic else {"llm_merging": {"seed": args.seed}})},
                                             sort_keys=False))
            command = [mergekit, str(recipe), str(d / "mergekit")]
        try:
            t_mk = _run([*command, "--lora-merge-cache", str(d / "lora_cache"),
                         "--random-seed", str(args.seed), "--quiet"], d / "mergekit.log")
            t_ours = _run([sys.executable, str(ROOT / "llm_merging" / "main.py"), "--recipe", str(recipe),
                           "--output_folder", str(d / "ours"), "--no-eval", "--seed", str(args.seed)], d / "ours.log", env)
            merged = list((d / "ours").glob("*/merged_model"))
            if len(merged) != 1:
                raise RuntimeError(f"expected one merged_model under {d / 'ours'}, found {merged}")
            theirs_dir = d / "mergekit"
            if isinstance(doc, list) and all("name" in x for x in doc):  # mergekit-multi: every named merge in -I
                theirs_dir = d / "mk_intermediates" / doc[-1]["name"]  # (our chains list their final merge last)
            ours, theirs = _load(merged[0]), _load(theirs_dir)
            method = merged[0].parent.name
        except RuntimeError as exc:
            failed += deterministic
            print(f"{name:44s} {'':18s} {'error':>13s}  {'FAIL' if deterministic else 'ERROR'}  {exc}")
            results.append({"recipe": name, "error": str(exc)})
            continue
        if deterministic:
            worst, where = compare(ours, theirs)
            ok = worst <= TOLERANCE
            failed += not ok
            print(f"{name:44s} {method:18s} {worst:13.3e}  {'PASS' if ok else 'FAIL'}     ({where})", flush=True)
            results.append({"recipe": name, "method": method, "max_rel_diff": worst, "tensor": where,
                            "pass": ok, "seconds": {"mergekit": t_mk, "ours": t_ours}})
        else:
            st = statistical(ours, theirs, base_tensors)
            print(f"{name:44s} {method:18s} {'statistical':>13s}  norm rel diff median {st['norm_med']:.3f} max "
                  f"{st['norm_max']:.3f}; mean diff/RMS median {st['mean_med']:.3f} max {st['mean_max']:.3f}", flush=True)
            results.append({"recipe": name, "method": method, "statistical": st,
                            "seconds": {"mergekit": t_mk, "ours": t_ours}})
    n_det = sum(1 for r in results if "max_rel_diff" in r or ("error" in r))
    print(f"\n{n_det - failed}/{n_det} deterministic recipes within {TOLERANCE:g} (runs under {runs})")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "tolerance": TOLERANCE, "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
