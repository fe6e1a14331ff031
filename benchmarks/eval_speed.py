"""Evaluation speed: ``--batch-size auto`` vs batch size 1 with the same engine, in one run, plus the
starter kit's own algorithm (``--kit``).

For each dataset (multiple choice: CosmosQA; generation: XSum) the same rows are evaluated through
``evaluation.evaluate_dataset`` with the auto batch size and with batch size 1, back to back and
interleaved ``--repeats`` times (best of each, which tames load spikes on a shared machine). Printed:
examples/s of each, their ratio, the CPU seconds of the process, and whether the predictions are
identical (multiple choice: the chosen index of every row and the largest score difference;
generation: identical texts). ``--kit`` adds the starter kit's code path at its batch size 1 (one
left-padded forward for the prompt, its cache repeated for every choice, logits kept at every choice
position; ``model.generate`` on left-padded prompts), checked against our ``mc_scoring="starter_kit"``
(same rule) and our greedy texts.

The model: ``--model PATH`` (a causal LM directory with its tokenizer), or a random Llama of the shape
given by ``--hidden/--layers/--vocab`` (``--shape llama-7b``: Llama-2-7B's shape) with the offline tiny
tokenizer (``--tokenizer PATH`` for another), or, with neither, the tiny offline decoder. ::

    python benchmarks/eval_speed.py --hidden 256 --layers 4 --vocab 32000 --threads 2 --kit
    python benchmarks/eval_speed.py --hidden 1024 --layers 4 --vocab 32000 --max-examples 100
    python benchmarks/eval_speed.py --shape llama-7b --device cuda --dtype bfloat16 --max-examples 0

Data: ``--data-dir`` (default ``../shared/data/starter_kit`` from the repository root) holding the
kit's ``cosmos_qa.json`` and ``xsum.json`` (JSON lines; ``--split validation`` reads
``validation/*.csv``). ``--max-examples 0`` takes every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llm_merging.data import load_examples  # noqa: E402
from llm_merging.evaluation import CPU_BATCH_SIZE, auto_batch_size, evaluate_dataset, plan_groups  # noqa: E402
from llm_merging.model import decoder_functions  # noqa: E402

FILES = {"json": {"cosmos_qa": "cosmos_qa.json", "xsum": "xsum.json"},
         "validation": {"cosmos_qa": "validation/cosmos_qa.csv", "xsum": "validation/xsum.csv"}}
SHAPES = {  # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "llama-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama-1b": (2048, 16, 32, 8, 8192, 32000),
}


def random_llama(hidden: int, layers: int, vocab: int, heads: int | None, kv_heads: int | None,
                 intermediate: int | None, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Llama of the given shape, built directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = heads or max(hidden // 64, 1)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or (hidden * 8 // 3 + 63) // 64 * 64,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def load_tokenizers(path: str):
    """The kit's decoder tokenizers: input left-padded; target right-padded, no BOS, EOS appended."""
    from transformers import AutoTokenizer

    inp = AutoTokenizer.from_pretrained(path, padding_side="left")
    tgt = AutoTokenizer.from_pretrained(path, padding_side="right", add_bos_token=False, add_eos_token=True)
    for tok in (inp, tgt):
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return inp, tgt


class DecoderMethod:
    """Duck-typed merge method around a causal LM (what the evaluator needs of a Merges class).

    ``kit=True``: the starter kit's scoring and generation code path instead of ours."""

    architecture = "decoder"

    def __init__(self, model, input_tokenizer, target_tokenizer, device: str, max_gen_len: int,
                 mc_scoring: str = "exact", kit: bool = False) -> None:
        self.name = "eval_speed"
        self.device = device
        self.max_gen_len = max_gen_len
        self.mc_scoring = mc_scoring
        self.kit = kit
        self.base_model = model
        self.input_tokenizer = input_tokenizer
        self.target_tokenizer = target_tokenizer

    def get_name(self) -> str:
        return self.name

    def predict_multiple_choice(self, batch):
        if self.kit:
            return kit_predict_multiple_choice(self.base_model, self.input_tokenizer, self.target_tokenizer, batch)
        return decoder_functions.predict_multiple_choice(
            self.base_model, self.input_tokenizer, self.target_tokenizer, batch, scoring=self.mc_scoring)

    def generate(self, batch):
        if self.kit:
            return kit_generate(self.base_model, self.input_tokenizer, batch, self.max_gen_len)
        return decoder_functions.generate(
            self.base_model, self.input_tokenizer, self.target_tokenizer, batch, self.max_gen_len)


# ------------------------------------------------------------------------------ the kit's algorithm
# The starter kit's decoder scoring, ported to the transformers Cache API (its tuple caches no longer
# work): prompts left-padded with a mask, one forward with the cache; the cache repeated for every
# choice; choices (target tokenizer, right-padded) run with the combined mask and default positions;
# logits kept for every choice position; score = sum over t >= 1 of log p(choice token t) (the first
# choice token is conditioned on, not scored).

@torch.inference_mode()
def kit_predict_multiple_choice(model, input_tokenizer, target_tokenizer, batch):
    from transformers import DynamicCache

    device = decoder_functions.model_device(model)
    choices = decoder_functions.choice_lists(batch)
    n_choices = len(choices[0])
    prompts = input_tokenizer(batch["input"], return_tensors="pt", padding="longest").to(device)
    flat = [c for cs in choices for c in cs]
    answers = target_tokenizer(flat, return_tensors="pt", padding="longest").to(device)
    out = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], use_cache=True)
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(out.past_key_values.layers):
        cache.update(layer.keys.repeat_interleave(n_choices, 0), layer.values.repeat_interleave(n_choices, 0), i)
    mask = torch.cat([prompts["attention_mask"].repeat_interleave(n_choices, 0), answers["attention_mask"]], 1)
    logits = model(input_ids=answers["input_ids"], attention_mask=mask, use_cache=True,
                   **{decoder_functions.cache_kwarg(model): cache}).logits.float()
    token_lp = -torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), answers["input_ids"][:, 1:].reshape(-1), reduction="none")
    scores = (token_lp.view(len(flat), -1) * answers["attention_mask"][:, 1:]).sum(-1).view(-1, n_choices)
    return scores.argmax(dim=1).cpu(), scores.cpu()


@torch.inference_mode()
def kit_generate(model, input_tokenizer, batch, max_gen_len):
    device = decoder_functions.model_device(model)
    prompts = input_tokenizer(batch["input"], return_tensors="pt", padding="longest").to(device)
    out = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                         max_new_tokens=max_gen_len, eos_token_id=input_tokenizer.eos_token_id,
                         pad_token_id=input_tokenizer.pad_token_id, do_sample=False, return_dict_in_generate=True)
    new = out.sequences[:, prompts["input_ids"].shape[1]:]
    return new.cpu().tolist(), input_tokenizer.batch_decode(new, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _once(method, rows, batch_size) -> tuple[float, float, dict]:
    _sync(method.device)
    t0, c0 = time.perf_counter(), time.process_time()
    preds, _partial, _ = evaluate_dataset(method, rows, batch_size=batch_size, progress=False)
    _sync(method.device)
    return time.perf_counter() - t0, time.process_time() - c0, preds


def _best(runs: list[tuple[float, float, dict]]) -> tuple[float, float, dict]:
    return min(runs, key=lambda r: r[0])


def _agreement(a: dict, b: dict) -> tuple[int, float | None]:
    """Rows with the same prediction, and the largest multiple-choice score difference (None: generation)."""
    same = sum(a[i]["prediction"] == b[i]["prediction"] for i in a)
    diffs = [abs(x - y) for i in a if "answer_choices_scores" in a[i]
             for x, y in zip(a[i]["answer_choices_scores"], b[i]["answer_choices_scores"])
             if x is not None and y is not None]
    return same, (max(diffs) if diffs else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "starter_kit"))
    ap.add_argument("--split", default="json", choices=list(FILES), help="kit JSON lines or validation CSVs")
    ap.add_argument("--datasets", nargs="+", default=["cosmos_qa", "xsum"], choices=["cosmos_qa", "xsum"])
    ap.add_argument("--max-examples", type=int, default=100, help="rows per dataset (0: all)")
    ap.add_argument("--model", default=None, help="causal LM directory (default: a random Llama or the tiny decoder)")
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="random Llama of a real model's shape")
    ap.add_argument("--hidden", type=int, default=None, help="random Llama: hidden size")
    ap.add_argument("--layers", type=int, default=4, help="random Llama: layers")
    ap.add_argument("--vocab", type=int, default=32000, help="random Llama: vocabulary (LM head) size")
    ap.add_argument("--heads", type=int, default=None, help="random Llama: attention heads (default hidden/64)")
    ap.add_argument("--kv-heads", type=int, default=None, help="random Llama: key/value heads (default: heads)")
    ap.add_argument("--intermediate", type=int, default=None, help="random Llama: MLP size (default 8/3 hidden)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a random Llama (default: tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", default="auto", help="'auto' or an int (the batched side)")
    ap.add_argument("--max-gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 2)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N interleaved timings")
    ap.add_argument("--kit", action="store_true", help="also time the starter kit's code path (batch size 1)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from llm_merging.model import tiny

    if args.model is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        label, tok_path = args.model, args.tokenizer or args.model
    elif args.shape or args.hidden:
        hidden, layers, heads, kv_heads, inter, vocab = SHAPES[args.shape] if args.shape else (
            args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab)
        model = random_llama(hidden, layers, vocab, heads, kv_heads, inter, args.device, dtype)
        label = (f"random Llama hidden {hidden}, {layers} layers, vocab {vocab}, "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
        tok_path = args.tokenizer or str(tiny.base_dir("decoder"))
    else:
        from transformers import AutoModelForCausalLM

        tok_path = str(tiny.base_dir("decoder"))
        model = AutoModelForCausalLM.from_pretrained(tok_path, dtype=dtype).to(args.device).eval()
        label = f"tiny decoder ({tok_path})"
    inp, tgt = load_tokenizers(tok_path)
    ours = DecoderMethod(model, inp, tgt, args.device, args.max_gen_len)
    kit = DecoderMethod(model, inp, tgt, args.device, args.max_gen_len, kit=True)
    ours_kit_rule = DecoderMethod(model, inp, tgt, args.device, args.max_gen_len, mc_scoring="starter_kit")

    data_dir = Path(args.data_dir)
    table = []
    for name in args.datasets:
        path = data_dir / FILES[args.split][name]
        if not path.exists():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        rows = load_examples(path, max_examples=args.max_examples or None)
        if args.batch_size == "auto":
            etype, order = plan_groups(rows)[0]
            bs = auto_batch_size(ours, etype, [rows[i] for i in order])
        else:
            bs = int(args.batch_size)
        evaluate_dataset(ours, rows[: min(4, len(rows))], batch_size=bs, progress=False)  # warm-up
        runs: dict[str, list] = {"auto": [], "one": [], "kit": []}
        for _ in range(args.repeats):  # interleaved, so a load spike hits every side alike
            runs["auto"].append(_once(ours, rows, None if args.batch_size == "auto" else bs))
            runs["one"].append(_once(ours, rows, 1))
            if args.kit:
                runs["kit"].append(_once(kit, rows, 1))
        fast, slow = _best(runs["auto"]), _best(runs["one"])
        same, diff = _agreement(fast[2], slow[2])
        entry = {"name": name, "n": len(rows), "bs": bs, "fast": fast, "slow": slow, "same": same, "diff": diff}
        if args.kit:
            entry["kit"] = k = _best(runs["kit"])
            reference = slow[2] if rows[0]["eval_type"] == "generation" else _once(ours_kit_rule, rows, 1)[2]
            entry["kit_same"] = _agreement(k[2], reference)
        table.append(entry)

    dev = args.device + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else "")
    print(f"\nmodel: {label}\ndevice: {dev}, dtype {args.dtype}, max_gen_len {args.max_gen_len}, "
          f"CPU auto batch sizes {CPU_BATCH_SIZE}, best of {args.repeats}")
    header = (f"{'dataset':<10} {'rows':>5} {'auto':>4} {'auto ex/s':>10} {'batch-1 ex/s':>13} {'speedup':>8} "
              f"{'cpu s auto/1':>13} {'same preds':>11} {'max |dscore|':>13}")
    if args.kit:
        header += f" {'kit ex/s':>9} {'auto/kit':>9} {'kit same':>9}"
    print(header)
    print("-" * len(header))
    for e in table:
        n, fast, slow = e["n"], e["fast"], e["slow"]
        diff = "-" if e["diff"] is None else f"{e['diff']:.1e}"
        line = (f"{e['name']:<10} {n:>5} {e['bs']:>4} {n / fast[0]:>10.2f} {n / slow[0]:>13.2f} "
                f"{slow[0] / fast[0]:>7.2f}x {fast[1]:>6.1f}/{slow[1]:<6.1f} {e['same']:>5}/{n:<5} {diff:>13}")
        if args.kit:
            k = e["kit"]
            line += f" {n / k[0]:>9.2f} {k[0] / fast[0]:>8.2f}x {e['kit_same'][0]:>4}/{n:<4}"
        print(line)
    print("(seconds: " + ", ".join(f"{e['name']} auto {e['fast'][0]:.1f} / batch-1 {e['slow'][0]:.1f}"
                                   + (f" / kit {e['kit'][0]:.1f}" if args.kit else "") for e in table) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
