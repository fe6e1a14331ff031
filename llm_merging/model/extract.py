"""LoRA extraction: a full fine-tune as a PEFT LoRA adapter of its base model (``llm-merging extract-lora``).

ΔW = fine-tune − base is read one tensor at a time (two tensors in memory, never a whole model), on the GPU
when there is one, and handed to :class:`~llm_merging.model.save.AdapterWriter`: LoRA factors of each
``Linear`` / ``Conv1D`` matrix by a truncated (randomized when the rank is small) SVD at a fixed rank or at
the smallest rank keeping a fraction of ‖ΔW‖_F², everything else kept exactly through ``modules_to_save``
(or the PEFT bias), with ``extract_report.json`` of the rank and relative error of every module.
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from llm_merging.core.devices import check_device
from llm_merging.core.errors import CheckpointError, ConfigError, first_line
from llm_merging.core.io import check_new_dir
from llm_merging.core.outputs import check_space
from llm_merging.model import auto_model_class, is_conv1d, vocab_modules
from llm_merging.model.checkpoint import FullExpert, name_summary
from llm_merging.model.refs import is_adapter_dir, resolve_ref
from llm_merging.model.save import EMBEDDING_MODES, AdapterWriter, LazyTensor

logger = logging.getLogger(__name__)

#: ``--dtype`` names of the saved LoRA factors
FACTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_options(rank: Any = None, energy: Any = None, max_rank: Any = None) -> None:
    """The rank rule's options, each a one-line ConfigError naming its flag: exactly one of ``rank`` (a
    positive integer) and ``energy`` (0 < E ≤ 1), ``max_rank`` (a positive integer) only with ``energy``."""
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank R or --energy E")
    if rank is not None and not positive_int(rank):
        raise ConfigError(f"--rank {rank!r}: expected a positive integer")
    if energy is not None:
        ok = isinstance(energy, (int, float)) and not isinstance(energy, bool) and math.isfinite(energy)
        if not ok or not 0 < energy <= 1:
            raise ConfigError(f"--energy {energy!r}: outside (0, 1]; expected a fraction of ‖ΔW‖_F² such as 0.9")
    if max_rank is not None:
        if rank is not None:
            raise ConfigError("--max-rank applies with --energy, not with --rank")
        if not positive_int(max_rank):
            raise ConfigError(f"--max-rank {max_rank!r}: expected a positive integer")


def _check_full_model(value: str, path: Path, flag: str) -> None:
    if is_adapter_dir(path):
        raise ConfigError(f"{flag} '{value}' is a PEFT adapter (adapter_config.json); extract-lora takes a full model")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{flag} '{value}': no config.json in {path}; expected a Hugging Face model directory")


def _config(path: Path, flag: str) -> dict:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{flag}: cannot read {path / 'config.json'}: {first_line(exc)}") from None


def meta_model(path: Path) -> torch.nn.Module:
    """The model of ``path``'s config on the meta device: module types and names, no weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
        arch = "encoder_decoder" if getattr(config, "is_encoder_decoder", False) else "decoder"
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto_model_class(arch).from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot build the model of {path / 'config.json'}: {first_line(exc)}") from None


def _check_pair(base: FullExpert, ft: FullExpert, flag_ft: str) -> None:
    """Same parameters and shapes: one line naming the first tensor that differs."""
    for name, (b_rows, f_rows) in sorted(ft.vocab_mismatch.items()):
        raise ConfigError(f"{flag_ft} '{ft.name}': tensor '{name}' has {f_rows} rows but the base model's has {b_rows} "
                          "(a different vocabulary cannot be written as a LoRA adapter)")
    for name, (b_rows, f_rows) in sorted(base.vocab_mismatch.items()):
        raise ConfigError(f"--base-model '{base.name}': tensor '{name}' has {f_rows} rows but its config says {b_rows}")
    missing = sorted(set(base.mapping) - set(ft.mapping))
    if missing:
        raise ConfigError(f"{flag_ft} '{ft.name}' lacks {len(missing)} tensor(s) of the base model "
                          f"({name_summary(missing, 3)}): not a fine-tune of this architecture")
    missing = sorted(set(ft.mapping) - set(base.mapping))
    if missing:
        raise ConfigError(f"--base-model '{base.name}' lacks {len(missing)} tensor(s) of the model "
                          f"({name_summary(missing, 3)})")


def _matrix_sizes(model: torch.nn.Module, embeddings: str) -> dict[str, int]:
    """min(out, in) of every matrix that may become LoRA factors."""
    vocab = {id(m) for m in vocab_modules(model)}
    out = {}
    for mod_name, module in model.named_modules():
        dense = isinstance(module, torch.nn.Linear) or is_conv1d(module)
        emb = isinstance(module, torch.nn.Embedding)
        if not (dense or emb) or (embeddings == "keep" and (emb or id(module) in vocab)):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            out[f"{mod_name}.weight"] = min(w.shape)
    return out


def extract_lora(base_model: str, model: str, out: str | Path, *, rank: int | None = None,
                 energy: float | None = None, max_rank: int | None = None, embeddings: str = "keep",
                 svd: str = "auto", device: str | None = None, dtype: str = "float32", progress: bool = True,
                 command: list[str] | None = None) -> dict[str, Any]:
    """Write ``model`` − ``base_model`` as a PEFT LoRA adapter in ``out`` (see the module docstring).

    Exactly one of ``rank`` / ``energy`` (with ``max_rank`` as the energy rule's cap). ``rank`` above a
    matrix's min(out, in) is capped there (the report shows each module's rank); above every matrix's it is
    an error. ``device``: ``auto`` / None (the GPU when there is one), ``cpu``, ``cuda[:N]``. ``dtype``: the
    saved factors' dtype (the report's errors include its rounding). Every input is checked (references,
    configs, tensor names and shapes, options, the output directory) before any weight is read. Returns the
    report (``extract_report.json``) with ``out`` and ``seconds``.
    """
    t0 = time.time()
    check_options(rank, energy, max_rank)
    if energy is not None and max_rank is None:
        logger.info("--energy without --max-rank: full SVDs where a module needs a high rank (give --max-rank to "
                    "bound the rank and use the faster randomized SVD)")
    if embeddings not in EMBEDDING_MODES:
        raise ConfigError(f"--embeddings {embeddings!r}: expected one of {', '.join(EMBEDDING_MODES)}")
    if dtype not in FACTOR_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(FACTOR_DTYPES)}")
    writer = AdapterWriter(rank=rank, energy=energy, max_rank=max_rank, svd=svd, embeddings=embeddings,
                           dtype=FACTOR_DTYPES[dtype])
    dev_name = check_device(device) if device else "auto"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if dev_name == "auto" else torch.device(dev_name)
    base_ref, base_path = resolve_ref(base_model, "--base-model")
    ft_ref, ft_path = resolve_ref(model, "--model")
    _check_full_model(base_model, base_path, "--base-model")
    _check_full_model(model, ft_path, "--model")
    out = check_new_dir(out, "--out", inputs=(base_path, ft_path))
    base_cfg, ft_cfg = _config(base_path, "--base-model"), _config(ft_path, "--model")
    for key in ("model_type", "architectures"):
        if base_cfg.get(key) != ft_cfg.get(key):
            raise ConfigError(f"--model '{model}' is a {ft_cfg.get(key)} ({key}) but --base-model '{base_model}' is a "
                              f"{base_cfg.get(key)}: not a fine-tune of this base")
    skeleton = meta_model(base_path)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    base = FullExpert(base_path, name=str(base_ref))
    base.bind(shapes)
    ft = FullExpert(ft_path, name=str(ft_ref))
    ft.bind(shapes)  # a tensor of another shape: one line naming it
    _check_pair(base, ft, "--model")
    if rank is not None:
        sizes = _matrix_sizes(skeleton, embeddings)
        if not sizes:
            raise ConfigError("the model has no Linear/Conv1D matrix to write as LoRA factors")
        largest = max(sizes.values())
        if rank > largest:
            raise ConfigError(f"--rank {rank} exceeds the size of every matrix (the largest min(out, in) is {largest})")
        capped = sorted(n for n, s in sizes.items() if s < rank)
        if capped:
            logger.info("--rank %d is above the size of %d matrices (%s): their rank is their size", rank,
                        len(capped), name_summary(capped, 3))
    bound = rank if rank is not None else max_rank
    if bound is not None:  # the factors alone, at most: a disk that cannot hold them fails now
        nbytes = sum(min(bound, min(shapes[n])) * sum(shapes[n]) * FACTOR_DTYPES[dtype].itemsize
                     for n in _matrix_sizes(skeleton, embeddings) if n in shapes)
        check_space([(out.parent if not out.exists() else out, nbytes, "the adapter's factors")])

    def read_base(name: str) -> torch.Tensor:
        value = base.raw_tensor(name, dtype=None) if name in base.mapping else None
        if value is None:
            raise ConfigError(f"--base-model '{base_model}': no tensor '{name}' to save with its module")
        return value

    writer.label, writer.fallback = "extract-lora", "keep the full fine-tune"
    writer.bind(skeleton, [ft], read=read_base)
    names = list(shapes)
    n_changed = 0
    try:
        for name in tqdm(names, desc="extract", unit="tensor", disable=not progress, leave=False):
            # both as stored, through each checkpoint's names (per-expert files of fused tensors, renames)
            theta0, raw = base.raw_tensor(name, dtype=None), ft.raw_tensor(name, dtype=None)
            if raw.dtype == theta0.dtype and torch.equal(raw, theta0):
                continue  # unchanged (the common case for frozen tensors): no float32 copies
            if not torch.isfinite(raw).all():
                raise CheckpointError(f"--model '{model}': tensor '{name}' holds NaN or Inf")
            if writer.plan(name, tuple(raw.shape)) != "lora":  # kept whole: read again when it is written
                if raw.dtype == theta0.dtype or bool(torch.count_nonzero(raw.float() - theta0.float())):
                    n_changed += 1
                    writer.keep(name, LazyTensor(lambda n=name: ft.raw_tensor(n, dtype=None), raw.shape, raw.dtype))
                continue
            delta = torch.sub(raw.to(device=dev), theta0.to(device=dev, dtype=torch.float32))  # float32
            del theta0, raw
            if bool(torch.count_nonzero(delta)):
                n_changed += 1
                writer(name, delta)
            del delta
        info = {"method": "extract-lora", "base": {"id": base_ref.id, "revision": base_ref.revision},
                "experts": [{"id": ft_ref.id, "revision": ft_ref.revision, "kind": "full"}],
                "hyperparameters": {"rank": rank, "energy": energy, "max_rank": max_rank, "embeddings": embeddings,
                                    "svd": svd, "dtype": dtype, "command": command}}
        writer.save(out, str(base_ref), info)  # the tensors kept whole are read again from the fine-tune here
    finally:
        base.close()
        ft.close()
    report = writer.report()
    report.update({"out": str(out), "seconds": round(time.time() - t0, 3), "tensors_changed": n_changed,
                   "tensors": len(names), "device": str(dev)})
    return report
