"""Chained merges: ``mergekit-multi`` against ``--recipe`` on the same multi-document recipe, and against the
same merges run one after another as separate runs through disk.

The chain: ``soup`` = task_arithmetic of two experts, ``blend`` = SLERP from ``soup`` towards a third expert
(a t gradient over depth), final = task_arithmetic of ``soup`` and ``blend`` over the base; at the users'
shape (default hidden 1024, vocabulary 32 000, 8 layers) in fp16. (No top-k method: fp16 task vectors
have many equal magnitudes, and at a top-k threshold the two tools legitimately keep different ones; the
fp32 parity of chains with TIES is in mergekit_parity.py.)
Each tool runs in a fresh process (``bench_util.run_measured``: its own wall and CPU time and peak RSS from
``wait4``); the script prints per way the wall and CPU time, the peak resident memory of the process and the
largest relative difference of the final tensors to mergekit-multi's::

    python benchmarks/chain_merge.py [--mergekit PATH/TO/MERGEKIT-VENV]
    python benchmarks/chain_merge.py --hidden 256 --layers 2 --vocab 4096

mergekit-multi is found next to mergekit-yaml (``--mergekit``: a virtual environment or its mergekit-yaml; else
``$MERGEKIT_VENV``, else PATH); without it only our two ways run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import mergekit_parity as parity  # noqa: E402  (its random base, tensor comparison)
from bench_util import find_mergekit, run_measured  # noqa: E402


def build_models(workdir: Path, hidden: int, layers: int, vocab: int) -> dict:
    """A random fp16 Llama-shaped base (mergekit_parity's) and three fp16 fine-tunes θᵢ = θ₀ + 0.01·nᵢ, made once."""
    import torch
    from safetensors.torch import load_file, save_file

    root = workdir / f"chain-models-h{hidden}-l{layers}-v{vocab}"
    base = root / "base"
    if not base.exists():
        root.mkdir(parents=True, exist_ok=True)
        fp32 = root / "base-fp32"
        if not fp32.exists():
            parity._random_base(fp32, hidden, layers, vocab)
        tmp = root / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(fp32, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        state = {}
        for f in sorted(fp32.glob("*.safetensors")):
            state.update({k: v.to(torch.float16) for k, v in load_file(str(f)).items()})
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = "float16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, base)
        shutil.rmtree(fp32, ignore_errors=True)
    experts = [root / f"expert{i}" for i in range(3)]
    theta = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for out in experts:
        if out.exists():
            continue
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
        state = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.float16) for k, v in theta.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out)
    return {"base": str(base), "experts": [str(e) for e in experts]}


def timed(cmd: list[str], log: Path, env: dict) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of ``cmd`` in a fresh process."""
    m = run_measured(cmd, env=env, cwd=ROOT, log=log)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({m.returncode}); see {log}")
    return m.wall_s, m.cpu_s, m.peak_rss_mib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mergekit", default=None, help="mergekit venv or its mergekit-yaml (mergekit-multi is taken next "
                                                    "to it; default: $MERGEKIT_VENV, then PATH)")
    p.add_argument("--workdir", default=os.environ.get("LLM_MERGING_PARITY_DIR", "/tmp/llm_merging_mergekit_parity"))
    args = p.parse_args(argv)

    import yaml

    workdir = Path(args.workdir)
    print(f"building models (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp16) ...", flush=True)
    models = build_models(workdir, args.hidden, args.layers, args.vocab)
    b, (e0, e1, e2) = models["base"], models["experts"]
    docs = [  # final first, as mergekit-multi's examples write it
        {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float16",
         "models": [{"model": "soup", "parameters": {"weight": 0.7}}, {"model": "blend", "parameters": {"weight": 0.5}}]},
        {"name": "soup", "merge_method": "task_arithmetic", "base_model": b, "dtype": "float16",
         "models": [{"model": e0, "parameters": {"weight": 0.6}}, {"model": e1, "parameters": {"weight": 0.4}}]},
        {"name": "blend", "merge_method": "slerp", "base_model": "soup", "dtype": "float16",
         "parameters": {"t": [0.2, 0.7, 0.4]}, "models": [{"model": "soup"}, {"model": e2}]},
    ]
    runs = workdir / f"chain-h{args.hidden}-l{args.layers}-v{args.vocab}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    chain = runs / "chain.yml"
    chain.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ours_cmd = [sys.executable, str(ROOT / "llm_merging" / "main.py"), "--no-eval", "--quiet", "--device", "cpu"]
    rows = []

    mergekit = find_mergekit("mergekit-yaml", args.mergekit)
    multi = Path(mergekit).with_name("mergekit-multi") if mergekit else None
    theirs = None
    if multi is not None and os.access(multi, os.X_OK):
        s, cpu, rss = timed([str(multi), str(chain), "--intermediate-dir", str((runs / "mk_intermediates").resolve()),
                        "--out-path", str((runs / "mergekit").resolve()), "--quiet"],
                       runs / "mergekit.log", env)
        theirs = parity._load(runs / "mergekit")
        rows.append(("mergekit-multi (intermediates on disk)", s, cpu, rss, 0.0))
    else:
        print("mergekit-multi not found: only our two ways run")

    s, cpu, rss = timed([*ours_cmd, "--recipe", str(chain), "--output_folder", str(runs / "ours")], runs / "ours.log", env)
    report = json.loads(next((runs / "ours").glob("*/report.json")).read_text())
    final = parity._load(next((runs / "ours").glob("*/merged_model")))
    where = report["chain"]["intermediates"]
    rows.append((f"llm_merging --recipe chain (intermediates: {where})", s, cpu, rss,
                 parity.compare(final, theirs)[0] if theirs is not None else float("nan")))

    # the same three merges as three runs, each reading the previous ones from disk
    total, total_cpu, peak, paths = 0.0, 0.0, 0.0, {}
    for doc in [docs[1], docs[2], docs[0]]:
        one = {k: v for k, v in doc.items() if k != "name"}
        text = yaml.safe_dump(one, sort_keys=False)
        for name, path in paths.items():
            text = re.sub(rf"(?m)(: ){re.escape(name)}$", rf"\g<1>{path}", text)
        tag = doc.get("name", "final")
        recipe = runs / f"{tag}.yml"
        recipe.write_text(text)
        s, cpu, rss = timed([*ours_cmd, "--recipe", str(recipe), "--output_folder", str(runs / f"sep-{tag}")],
                       runs / f"sep-{tag}.log", env)
        total, total_cpu, peak = total + s, total_cpu + cpu, max(peak, rss)
        paths[tag] = str(next((runs / f"sep-{tag}").glob("*/merged_model")).resolve())
    separate = parity._load(Path(paths["final"]))
    rows.append(("llm_merging, three runs through disk", total, total_cpu, peak,
                 parity.compare(separate, theirs)[0] if theirs is not None else float("nan")))
    same = all(bool((final[k] == separate[k]).all()) for k in final)

    print(f"\nchain soup -> blend -> final, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp16, CPU")
    print(f"{'way':52s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s} {'max rel diff vs mergekit':>25s}")
    for name, s, cpu, rss, diff in rows:
        print(f"{name:52s} {s:8.1f} {cpu:8.1f} {rss:13.0f} {diff:25.2e}")
    print(f"chain == three separate runs, tensor for tensor: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
