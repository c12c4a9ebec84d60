"""Device names as users give them (--device, TrainConfig.device), checked and resolved.

Shared by training, sampling and analysis, which take the same names.
"""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"; ValueError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r} but there are {torch.cuda.device_count()} CUDA devices")
    return device
