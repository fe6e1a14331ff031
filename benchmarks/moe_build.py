"""MoE building side by side: ``llm-merging moe`` against ``mergekit-moe`` (0.1.5) on the same YAML.

For each depth of ``--layers`` (default 4, 16 and 32), builds (once, cached under ``--workdir``) an fp16
Llama-shaped base (vocabulary ``--vocab``, hidden ``--hidden``, MLP width ``--intermediate``) and ``--experts``
full fine-tunes of it (base + seeded noise), then for each gate mode (``--modes``, default random and hidden)
runs both tools on the same config ``--repeat`` times, alternating, each run in a fresh process started after
the disk writes of the previous one are flushed (the median wall seconds; the largest peak RSS of the child
from ``wait4``), and compares the outputs: every expert tensor and, for prompt gates, the router rows (max
relative difference; mergekit's ``random`` is unseeded, so its routers are not compared). Our runs include
flushing the output to the disk (fsync); mergekit-moe leaves that to the kernel after it exits.

    python benchmarks/moe_build.py [--vocab 32000] [--hidden 1024] [--layers 4 16 32]
        [--experts 4] [--modes random hidden] [--repeat 3] [--workdir DIR] [--mergekit PATH/TO/MERGEKIT-VENV]

mergekit is found through ``--mergekit`` (a venv or the executable), ``$MERGEKIT_VENV`` or PATH; it runs as a
command, never imported. Without it only our side runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from bench_util import find_mergekit, log_tail, run_measured  # benchmarks/ is sys.path[0]

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [["Write a Python function that sorts a list", "def main():"],
           ["Solve for x: 3x + 5 = 11", "What is the derivative of sin(x)?"],
           ["Summarise the following news article", "In a statement on Monday, officials said"],
           ["Translate into French: good morning", "Wie geht es dir?"],
           ["Once upon a time there was a dragon", "Write a poem about the sea"],
           ["The patient presented with a fever", "Symptoms of influenza include"]]


def build(workdir: Path, vocab: int, hidden: int, layers: int, intermediate: int, experts: int) -> dict:
    """The fp16 base and its fine-tunes (cached by shape); the tiny tokenizer (fewer tokens than rows)."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from llm_merging.model import tiny

    tag = f"v{vocab}-h{hidden}-l{layers}-i{intermediate}"
    base = workdir / f"base-{tag}"
    out = {"base": base, "experts": [workdir / f"ft{i}-{tag}" for i in range(experts)]}
    if all((p / "model.safetensors").is_file() for p in [base, *out["experts"]]):
        return out
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(str(base))
    tok = tiny.base_dir("decoder")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).is_file():
            shutil.copy(tok / f, base / f)
    del model
    state = load_file(str(base / "model.safetensors"))
    for i, path in enumerate(out["experts"]):
        gen = torch.Generator().manual_seed(10 + i)
        ft = {k: (v.float() + torch.randn(v.shape, generator=gen) * 0.002).to(v.dtype) for k, v in state.items()}
        path.mkdir(parents=True, exist_ok=True)
        save_file(ft, str(path / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(base / "config.json", path / "config.json")
    return out


def config(models: dict, mode: str) -> dict:
    experts = []
    for i, path in enumerate(models["experts"]):
        e = {"source_model": str(path)}
        if mode != "random":
            e["positive_prompts"] = PROMPTS[i % len(PROMPTS)]
            e["negative_prompts"] = PROMPTS[(i + 1) % len(PROMPTS)][:1]
        experts.append(e)
    return {"base_model": str(models["base"]), "gate_mode": mode, "dtype": "float16", "experts_per_token": 2,
            "experts": experts}


def timed(cmd: list[str], log: Path) -> tuple[float, float, int, str]:
    """Run ``cmd`` in a fresh process (output to ``log``): (wall s, its peak RSS MiB, exit status, log tail)."""
    m = run_measured(cmd, log=log, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return m.wall_s, m.peak_rss_mib, m.returncode, log_tail(log) if m.returncode else ""


def compare(ours: Path, theirs: Path, layers: int, experts: int, gates: bool) -> dict:
    """Max relative differences: expert tensors (ours per expert, mergekit's fused) and router rows."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict:
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    a, b = tensors(ours), tensors(theirs)

    def rel(x, y):
        return float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-12))

    worst_expert = worst_gate = 0.0
    for layer in range(layers):
        p, q = f"model.layers.{layer}.block_sparse_moe", f"model.layers.{layer}.mlp"
        gate_up, down = b[f"{q}.experts.gate_up_proj"], b[f"{q}.experts.down_proj"]
        for e in range(experts):
            mine = torch.cat([a[f"{p}.experts.{e}.w1.weight"], a[f"{p}.experts.{e}.w3.weight"]], dim=0)
            worst_expert = max(worst_expert, rel(mine, gate_up[e]), rel(a[f"{p}.experts.{e}.w2.weight"], down[e]))
        if gates:
            worst_gate = max(worst_gate, rel(a[f"{p}.gate.weight"], b[f"{q}.gate.weight"]))
    return {"experts_max_rel_diff": worst_expert, "gates_max_rel_diff": worst_gate if gates else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32], help="depths to measure, one after another")
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=["random", "hidden"])
    p.add_argument("--repeat", type=int, default=3, help="runs of each tool (alternating); the median time is kept")
    p.add_argument("--workdir", default=os.environ.get("LLM_MERGING_BENCH_DIR", "/tmp/llm_merging_moe_bench"))
    p.add_argument("--mergekit", default=None,
                   help="mergekit venv or its mergekit-moe (default: $MERGEKIT_VENV, then PATH)")
    args = p.parse_args()
    import yaml

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mk = find_mergekit("mergekit-moe", args.mergekit)
    rows = []
    for layers in args.layers:
        models = build(workdir, args.vocab, args.hidden, layers, args.intermediate, args.experts)
        for mode in args.modes:
            cfg = workdir / f"moe-{mode}-l{layers}.yml"
            cfg.write_text(yaml.safe_dump(config(models, mode), sort_keys=False), encoding="utf-8")
            ours_dir, theirs_dir = workdir / f"ours-{mode}", workdir / f"mergekit-{mode}"
            row = {"layers": layers, "mode": mode}
            tools = [("ours", [sys.executable, str(ROOT / "llm_merging" / "main.py"), "moe", str(cfg), str(ours_dir),
                               "-q"], ours_dir)]
            if mk:
                tools.append(("mergekit", [mk, str(cfg), str(theirs_dir), "--device", "cpu"], theirs_dir))
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in tools}
            for _ in range(args.repeat):  # alternating, so that both see the same load of a shared machine
                for name, cmd, out_dir in tools:
                    shutil.rmtree(out_dir, ignore_errors=True)
                    wall, rss, rc, err = timed(cmd, workdir / f"{name}-{mode}.log")
                    if rc:
                        print(f"{name} failed ({mode}, {layers} layers): {err}", file=sys.stderr)
                        return 1
                    runs[name].append((wall, rss))
            for name in runs:  # the median wall time, the largest peak RSS
                walls = sorted(w for w, _ in runs[name])
                row[f"{name}_s"] = round(walls[len(walls) // 2], 2)
                row[f"{name}_rss_mib"] = round(max(r for _, r in runs[name]))
            if mk:
                row.update(time_ratio=round(row["ours_s"] / row["mergekit_s"], 3),
                           rss_ratio=round(row["ours_rss_mib"] / row["mergekit_rss_mib"], 3))
                row.update(compare(ours_dir, theirs_dir, layers, args.experts, gates=mode != "random"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    shape = f"vocab {args.vocab}, hidden {args.hidden}, MLP {args.intermediate}, {args.experts} experts, fp16"
    print(f"\n{shape}; mergekit-moe: {mk or 'not found'}")
    print(f"{'layers':>6} {'gate_mode':<10} {'ours s':>8} {'mk s':>8} {'ours MiB':>9} {'mk MiB':>8} {'time x':>7} "
          f"{'RSS x':>6}")
    for r in rows:
        print(f"{r['layers']:>6} {r['mode']:<10} {r['ours_s']:>8} {r.get('mergekit_s', '-'):>8} {r['ours_rss_mib']:>9} "
              f"{r.get('mergekit_rss_mib', '-'):>8} {r.get('time_ratio', '-'):>7} {r.get('rss_ratio', '-'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
