"""Unsharded state from expert-parallel ranks, and each rank's shard of an unsharded state.

Shapes: E experts, L local experts per rank (E / W), W ranks in the expert-parallel group.

Checkpoints always hold the full model (expert weights [E, ...]), so a run saved at one
expert-parallel size loads at any other: saving all-gathers the expert shards along the
expert dimension, loading slices this rank's experts [offset, offset + L). The same goes
for per-parameter optimizer state (AdamW moments), addressed by parameter name.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.parallel.expert_parallel import ShardedExpertBank, sharded_banks


def _sharded_tensors(module: nn.Module) -> dict[str, ShardedExpertBank]:
    """State-dict name of every expert-sharded tensor -> the bank that holds it."""
    out = {}
    for prefix, bank in sharded_banks(module).items():
        for name, _ in bank.named_parameters():
            out[f"{prefix}.{name}" if prefix else name] = bank
    return out


def _gather_experts(local: Tensor, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def full_state_dict(module: nn.Module, group: dist.ProcessGroup | None) -> dict[str, Tensor]:
    """module.state_dict() with every expert shard gathered to the full [E, ...] tensor.

    A collective: every rank of the expert-parallel group must call it. Keys and order
    are those of the same model on one process.
    """
    sharded = _sharded_tensors(module)
    out = {}
    for name, t in module.state_dict().items():
        t = t.detach()
        out[name] = _gather_experts(t, group) if name in sharded else t.clone()
    return out


def shard_state_dict(module: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's view of a full state dict: expert tensors sliced, the rest as given."""
    sharded = _sharded_tensors(module)
    return {n: sharded[n].local_slice(t) if n in sharded else t for n, t in full.items()}


def load_full_state_dict(module: nn.Module, full: dict[str, Tensor]) -> None:
    """Load a full (unsharded) state dict into an expert-parallel module, strictly."""
    module.load_state_dict(shard_state_dict(module, full), strict=True)


def _param_of(key: str, names: set[str], prefix: str) -> str | None:
    """'optim.<param name>.<field>' -> param name when it names a sharded parameter."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :].rsplit(".", 1)[0]
    return name if name in names else None


def full_named_state(
    module: nn.Module,
    tensors: dict[str, Tensor],
    group: dist.ProcessGroup | None,
    prefix: str = "optim.",
) -> dict[str, Tensor]:
    """Gather per-parameter state keyed '<prefix><param name>.<field>' (e.g. AdamW moments).

    Entries of sharded parameters shaped like the local shard are gathered along the
    expert dimension; everything else (step counters, RNG state) is kept as is. A
    collective: every rank calls it with the same keys.
    """
    sharded = _sharded_tensors(module)
    local_shapes = {n: p.shape for n, p in module.named_parameters() if n in sharded}
    out = {}
    for key in sorted(tensors):
        t = tensors[key]
        name = _param_of(key, set(sharded), prefix)
        if name is not None and t.shape == local_shapes[name]:
            out[key] = _gather_experts(t.detach(), group)
        else:
            out[key] = t
    return out


def shard_named_state(
    module: nn.Module, tensors: dict[str, Tensor], prefix: str = "optim."
) -> dict[str, Tensor]:
    """This rank's slice of per-parameter state written by full_named_state."""
    sharded = _sharded_tensors(module)
    out = {}
    for key, t in tensors.items():
        name = _param_of(key, set(sharded), prefix)
        bank = sharded.get(name) if name is not None else None
        is_full = bank is not None and t.dim() > 0 and t.shape[0] == bank.num_global_experts
        out[key] = bank.local_slice(t).clone() if is_full else t
    return out
