"""Model references: a local directory, or a Hugging Face hub id with an optional revision.

References are resolved to local directories (through the standard Hugging Face cache) before any
weights are loaded, so that a missing model costs seconds, not a GPU hour.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_merging.core.errors import ModelNotFoundError, first_line

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass
class ModelRef:
    """A model or adapter: ``id`` (path or hub id), ``revision`` and, once resolved, ``local_path``."""

    id: str
    revision: str | None = None
    local_path: Path | None = None

    @classmethod
    def parse(cls, value: Any) -> "ModelRef":
        """Accept ``"path"``, ``"org/name@rev"``, ``("org/name", rev)`` or a ModelRef."""
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, (tuple, list)):
            if not value or len(value) > 2:
                raise ModelNotFoundError(f"model reference {value!r} must be (id, revision) or a string")
            return cls(str(value[0]), (str(value[1]) if len(value) > 1 and value[1] else None))
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise ModelNotFoundError(f"model reference {value!r} must be a non-empty string")
        value = value.strip()
        if "@" in value and not os.path.exists(value):
            ident, _, rev = value.rpartition("@")
            if ident:
                return cls(ident, rev or None)
        return cls(value)

    def __str__(self) -> str:
        return f"{self.id}@{self.revision}" if self.revision else self.id

    @property
    def is_adapter(self) -> bool:
        """True when the resolved directory holds a PEFT adapter (``adapter_config.json``)."""
        return self.local_path is not None and is_adapter_dir(self.local_path)

    def resolve(self, token: str | None = None, flag: str | None = None) -> Path:
        """Return the local directory of this reference, from disk or the Hugging Face cache (``flag``: the
        option or argument that gave it, named in the hint of a not-found error)."""
        if self.local_path is None:
            self.local_path = resolve_path(self.id, self.revision, token, flag=flag)
        return self.local_path


def hf_token() -> str | None:
    """``HF_AUTH_TOKEN`` (the starter kit's variable) or ``HF_TOKEN``; unset or empty means none."""
    return os.environ.get("HF_AUTH_TOKEN") or os.environ.get("HF_TOKEN") or None


def resolve_ref(value: str, label: str) -> tuple[ModelRef, Path]:
    """Parse ``value`` (``path``, ``id`` or ``id@revision``) and resolve it with the Hugging Face token
    (`hf_token`); ``label`` is the option or argument that gave it (``--base-model``, ``MODEL``): a
    ModelNotFoundError is one line starting with it. Returns the reference and its local directory."""
    try:
        ref = ModelRef.parse(value)
        return ref, ref.resolve(hf_token(), flag=label)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{label}: {exc}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_local(model_id: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1


def resolve_path(model_id: str, revision: str | None = None, token: str | None = None, *,
                 flag: str | None = None) -> Path:
    """Resolve ``model_id`` to a local directory.

    Order: an existing local directory; the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) for
    ``revision``; a download when the Hub is reachable and ``HF_HUB_OFFLINE`` is not set.
    Raises ModelNotFoundError with one line naming the model and how to provide it (``flag``: the option or
    argument to give a local directory with; default ``--base-model/--models``).
    """
    expanded = Path(os.path.expanduser(model_id))
    if expanded.is_dir():
        return expanded.resolve()
    if expanded.exists():
        raise ModelNotFoundError(f"model '{model_id}' is a file, expected a model or adapter directory")
    if _looks_local(model_id):
        raise ModelNotFoundError(f"model directory '{model_id}' does not exist")
    from huggingface_hub import snapshot_download

    rev = f" (revision {revision})" if revision else ""
    try:
        return Path(snapshot_download(model_id, revision=revision, token=token, local_files_only=True))
    except Exception:
        pass
    how = (
        f"download it first (`hf download {model_id}{' --revision ' + revision if revision else ''}`), "
        f"or pass a local directory {'as ' + flag if flag else 'with --base-model/--models'}"
    )
    if _offline():
        raise ModelNotFoundError(
            f"model '{model_id}'{rev} is not a local directory and not in the Hugging Face cache "
            f"(HF_HUB_OFFLINE is set); {how}"
        )
    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
        path = Path(snapshot_download(model_id, revision=revision, token=token, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older repositories ship only PyTorch .bin weights
            path = Path(snapshot_download(model_id, revision=revision, token=token, allow_patterns=patterns + ["*.bin"]))
        return path
    except Exception as exc:
        reason = first_line(exc)
        raise ModelNotFoundError(
            f"model '{model_id}'{rev} could not be found locally or downloaded ({reason[:200]}); {how}"
        ) from None
