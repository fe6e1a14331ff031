"""Devices a run may ask for, checked against this machine."""
from __future__ import annotations

import torch

from llm_merging.core.errors import ConfigError


def check_device(name: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine; ConfigError otherwise."""
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError(f"--device {name}: no GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= n:
            raise ConfigError(f"--device {name}: this machine has {n} GPU(s)")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name
