"""Storage the CPU expert loop reuses from one training step to the next.

Shapes: E experts, D model dim, F expert hidden dim, A assignments. Two kinds of buffer,
one per name: the gradient of each stacked expert weight ([E, F, D] or [E, D, F]), and
the gate and up projections [A, F] that forward keeps for backward.

Why. Both are far above glibc's largest mmap threshold (32 MiB) in a layer of real size,
so each step maps fresh pages and the kernel zeroes them on first touch, inside the
matmuls that write them. The CPU fast path (moekit.fused_experts) writes every byte of
them, so it can write into last step's storage instead. For the coarse benchmark layer
(D=1024, F=2816, E=8, K=2): three 92 MB gradients took forward+backward from 1609 to
1553 ms; two 92 MB projections, in one process beside the code that allocated them,
from 1488-1544 to 1459-1536 ms, and 1615-1650 to 1564-1616 ms in the fine-grained layer
(benchmarks/README.md).

Safety. A buffer is reused only while nothing but this holder refers to its storage. A
gradient: once `optimizer.zero_grad(set_to_none=True)` (or `p.grad = None`) has dropped
it and no other tensor or view shares it. Otherwise (the gradient is still attached and
about to be accumulated into, a caller kept it or a view of it) a new buffer is allocated
and held instead, so no gradient anyone can still see is ever overwritten. A projection:
once the backward that read it has run and freed its graph; a second forward before
that (two graphs alive, retain_graph) gets new storage. What this costs: between steps
the holder keeps each buffer's memory, as `zero_grad(set_to_none=False)` would for the
gradients; `release()` gives it back.
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


class StepBuffers:
    """Reusable storage, one buffer per name (a weight's gradient or a kept projection of
    one expert bank)."""

    def __init__(self) -> None:
        self._held: dict[str, Tensor] = {}

    def take(self, name: str, like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """Uninitialised storage shaped like `like` (or `shape`, with like's dtype and
        device): the last step's if free, else new.

        The result is a fresh tensor object on the held storage, so autograd can adopt
        it as the parameter's `.grad` without copying.
        """
        shape = like.shape if shape is None else torch.Size(shape)
        held = self._held.get(name)
        reusable = (
            held is not None
            and held.shape == shape
            and held.dtype == like.dtype
            and held.device == like.device
            and _only_holder(held)
        )
        if not reusable:
            held = like.new_empty(shape)
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
    def __deepcopy__(self, memo: dict) -> StepBuffers:
        return StepBuffers()

    def __getstate__(self) -> dict:
        return {"_held": {}}
