"""Gradient storage for stacked expert weights, reused from one backward to the next.

Shapes: E experts, D model dim, F expert hidden dim; one buffer per stacked weight
([E, F, D] or [E, D, F]).

Why. A stacked expert weight's gradient is E/K times the size of a dense layer of the
same active FLOPs (4x in Mixtral's 8-choose-2), and each of them is far above glibc's
largest mmap threshold (32 MiB), so every backward maps fresh pages and the kernel
zeroes them on first touch, inside the matmuls that write the gradient. The CPU fast path
(moekit.fused_experts) writes every byte of its weight gradients, so it can write them
into last step's storage instead: for the coarse benchmark layer (D=1024, F=2816, E=8,
K=2; three 92 MB gradients) that took forward+backward from 1609 to 1553 ms
(benchmarks/README.md).

Safety. A buffer is reused only while nothing but this holder refers to its storage:
once `optimizer.zero_grad(set_to_none=True)` (or `p.grad = None`) has dropped the
parameter's gradient and no other tensor or view shares it. Otherwise (the gradient is
still attached and about to be accumulated into, a caller kept it or a view of it) a new
buffer is allocated and held instead, so no gradient anyone can still see is ever
overwritten. What this costs: between steps the holder keeps one gradient's worth of
memory per weight, as `zero_grad(set_to_none=False)` would; `release()` gives it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

# torch's count of references to a storage; a private helper, so without it nothing is
# reused (every take allocates) rather than guessing.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _only_holder(held: Tensor) -> bool:
    """True when `held` is the only tensor using its storage."""
    if _storage_use_count is None:
        return False
    storage = held.untyped_storage()
    # One reference from `held`, one from the `storage` object made just above.
    return _storage_use_count(storage._cdata) == 2


class GradBuffers:
    """Reusable gradient storage, one buffer per name (a weight of one expert bank)."""

    def __init__(self) -> None:
        self._held: dict[str, Tensor] = {}

    def take(self, name: str, like: Tensor) -> Tensor:
        """Uninitialised storage shaped like `like`: last backward's if free, else new.

        The result is a fresh tensor object on the held storage, so autograd can adopt
        it as the parameter's `.grad` without copying.
        """
        held = self._held.get(name)
        reusable = (
            held is not None
            and held.shape == like.shape
            and held.dtype == like.dtype
            and held.device == like.device
            and _only_holder(held)
        )
        if not reusable:
            held = torch.empty_like(like, requires_grad=False)
            self._held[name] = held
        return held.detach()

    def release(self) -> None:
        """Let go of every held buffer (gradients still attached to parameters stay)."""
        self._held.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of storage held (shared with live gradients or not)."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    # A copied or pickled module starts with nothing held: a copy must never share
    # gradient storage with its original, and held buffers are scratch, not state.
    def __deepcopy__(self, memo: dict) -> GradBuffers:
        return GradBuffers()

    def __getstate__(self) -> dict:
        return {"_held": {}}
