"""What this process used and what the machine has: peak memory, free memory, library versions."""
from __future__ import annotations

import importlib.metadata as metadata
import platform
import resource
from typing import Any

import psutil
import torch


def peak_memory() -> dict[str, Any]:
    """Peak resident memory of this process and, when there is a GPU, peak GPU memory (MiB)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {"peak_rss_mib": round(rss_kb / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a run's results depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("llm_merging", "torch", "transformers", "peft", "safetensors", "accelerate", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
