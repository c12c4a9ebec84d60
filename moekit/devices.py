"""Device names as users give them (--device, TrainConfig.device), checked and resolved.

Shared by training, sampling and analysis, which take the same names.
"""

from __future__ import annotations

import os

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


def memory_bytes(device: torch.device) -> int | None:
    """The device's total memory (a CPU's physical RAM); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def check_fits(what: str, num_bytes: int, device: torch.device) -> None:
    """ValueError when `num_bytes` cannot fit in the device's whole memory.

    Before the allocation: a model many times the memory would otherwise meet the
    allocator's error, or, on a CPU with overcommit, the out-of-memory killer.
    """
    total = memory_bytes(device)
    if total is not None and num_bytes > total:
        raise ValueError(
            f"{what} needs about {num_bytes / 2**30:.1f} GiB, more than the "
            f"{total / 2**30:.1f} GiB of {device.type}"
        )
