"""Offline tiny twin models for ``--tiny`` runs and tests.

Everything is built on the fly from fixed seeds (random weights, a real BPE tokenizer trained on
built-in text), written once into a cache directory and reused:

* a tiny Llama-architecture decoder base, LoRA experts made with PEFT and full fine-tunes;
* a tiny T5 encoder-decoder base with its LoRA experts and full fine-tunes.

Nothing here touches the network.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from llm_merging.core.errors import ConfigError
from llm_merging.core.io import temp_path
from llm_merging.core.outputs import sweep
from llm_merging.model import auto_model_class

logger = logging.getLogger(__name__)

TINY_VERSION = "v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
SAMPLE_DATA_DIR = Path(__file__).parent.parent / "sample_data"

# Mixed ranks and target modules on purpose: merging must not assume they agree.
_DECODER_LORA = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "o_proj", "down_proj"], "use_rslora": True},
]
_T5_LORA = [
    {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]},
    {"r": 8, "lora_alpha": 16, "target_modules": ["q", "k", "v", "o", "wi", "wo"]},
    {"r": 2, "lora_alpha": 4, "target_modules": ["q", "v", "wo"]},
]


def cache_dir() -> Path:
    """Root of the tiny-model cache (``$LLM_MERGING_TINY_CACHE`` or ``~/.cache/llm_merging/tiny``)."""
    root = os.environ.get("LLM_MERGING_TINY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm_merging", "tiny"
    )
    return Path(root) / TINY_VERSION


def _corpus() -> list[str]:
    """Training text for the tiny tokenizer: the sample data shipped with the package plus a few lines."""
    lines = [
        "The quick brown fox jumps over the lazy dog.",
        "According to the above context, choose the best option to answer the following question.",
        "Question: Options: A. B. C. D. None of the above choices. A summary is",
    ]
    for path in sorted(SAMPLE_DATA_DIR.glob("*")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


def build_tokenizer(out_dir: str | Path, *, encoder_decoder: bool = False):
    """Train a small byte-fallback BPE tokenizer offline and save it in Hugging Face format.

    Decoder flavour behaves like Llama's (BOS added, no pad token); the encoder-decoder flavour like T5's
    (no BOS, EOS appended, ``<pad>`` is the pad token).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False
    )
    bpe.train_from_iterator(_corpus(), trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    kwargs = dict(vocab=spec["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if encoder_decoder:
        tok = LlamaTokenizer(**kwargs, pad_token="<pad>", add_bos_token=False, add_eos_token=True)
    else:
        tok = LlamaTokenizer(**kwargs, add_bos_token=True, add_eos_token=False)
    tok.model_max_length = 4096
    tok.save_pretrained(str(out_dir))
    return tok


def train_bpe_tokenizer(out_dir: str | Path, lines: list[str], vocab_size: int, *, byte_level: bool = False):
    """Train a BPE tokenizer on ``lines`` offline and save it in Hugging Face format: SentencePiece style
    (``▁``, byte fallback, Llama class) or, with ``byte_level``, GPT-2 style (byte-level ``Ġ``, GPT2 class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer, LlamaTokenizer

    if byte_level:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[
            "<unk>", "<s>", "</s>", *[f"<0x{i:02X}>" for i in range(256)]])
    bpe.train_from_iterator(lines, trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    if byte_level:
        tok = GPT2Tokenizer(vocab=spec["vocab"], merges=merges, unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        tok = LlamaTokenizer(vocab=spec["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                             eos_token="</s>")
    tok.save_pretrained(str(out_dir))
    return tok


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temporary sibling and rename it into place (no half-built cache)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent, recursive=False)  # what a killed build left
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        with warnings.catch_warnings():  # library deprecation chatter while building toy models
            warnings.simplefilter("ignore")
            build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _decoder_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )


def _t5_config(vocab_size: int):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=3, eos_token_id=2, decoder_start_token_id=3,
        relative_attention_num_buckets=8, tie_word_embeddings=True,
    )


def _new_model(architecture: str, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = _decoder_config(vocab_size) if architecture == "decoder" else _t5_config(vocab_size)
    return auto_model_class(architecture).from_config(config).eval()


def _load_base(architecture: str):
    """The tiny base model, loaded from its cache directory."""
    return auto_model_class(architecture).from_pretrained(str(base_dir(architecture)))


def base_dir(architecture: str = "decoder") -> Path:
    """Path of the tiny base model (built on first use)."""
    _check_arch(architecture)
    target = cache_dir() / architecture / "base"

    def build(tmp: Path) -> None:
        tok = build_tokenizer(tmp, encoder_decoder=architecture == "encoder_decoder")
        model = _new_model(architecture, len(tok), seed=0)
        model.save_pretrained(str(tmp))
        logger.info("built tiny %s base at %s", architecture, target)

    return _atomic_dir(target, build)


def lora_expert_dir(architecture: str = "decoder", index: int = 0, uniform: bool = False) -> Path:
    """Path of tiny LoRA expert ``index`` (a real PEFT adapter with random, nonzero A and B).

    Experts differ in rank and target modules, unless ``uniform``: then all share the first one's
    configuration (for starter-kit classes that average A and B matrices directly).
    """
    _check_arch(architecture)
    target = cache_dir() / architecture / (f"lora-u{index}" if uniform else f"lora-{index}")

    def build(tmp: Path) -> None:
        from peft import LoraConfig, get_peft_model

        model = _load_base(architecture)
        specs = _DECODER_LORA if architecture == "decoder" else _T5_LORA
        spec = dict(specs[0 if uniform else index % len(specs)])
        task = "CAUSAL_LM" if architecture == "decoder" else "SEQ_2_SEQ_LM"
        peft_model = get_peft_model(model, LoraConfig(task_type=task, lora_dropout=0.0, **spec))
        gen = torch.Generator().manual_seed(1000 + index)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir(architecture))
        peft_model.save_pretrained(str(tmp))

    return _atomic_dir(target, build)


def full_expert_dir(architecture: str = "decoder", index: int = 0) -> Path:
    """Path of tiny full fine-tune ``index``: the base plus seeded noise on every parameter."""
    _check_arch(architecture)
    target = cache_dir() / architecture / f"full-{index}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        model = _load_base(architecture)
        gen = torch.Generator().manual_seed(2000 + index)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.02)
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(base_dir(architecture))).save_pretrained(str(tmp))

    return _atomic_dir(target, build)


def sample_data_files() -> list[str]:
    """The sample evaluation files of ``--tiny`` runs: kit JSON lines (CosmosQA/XSum style) and a kit test CSV."""
    return [str(SAMPLE_DATA_DIR / n) for n in ("cosmos_qa_sample.json", "xsum_sample.json", "test_sample.csv")]


def calibration_files() -> list[str]:
    """The calibration prompts of ``--tiny`` runs of data-aware methods: the inputs of the sample JSON files."""
    return [str(SAMPLE_DATA_DIR / n) for n in ("cosmos_qa_sample.json", "xsum_sample.json")]


def _check_arch(architecture: str) -> None:
    if architecture not in ("decoder", "encoder_decoder"):
        raise ConfigError(f"architecture must be 'decoder' or 'encoder_decoder', got {architecture!r}")
