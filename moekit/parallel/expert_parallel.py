"""apply_expert_parallel: shard the experts of a built model over a process group.

Shapes: E experts, L local experts per rank (E / W), W ranks, D model dim, F expert hidden.

Applied from outside, after the model is built on one device: every `MoE` inside the
module keeps its router and shared experts, gets an expert bank holding only this rank's
slice of the stacked expert weights, and an `AllToAllPath` in place of local dispatch.
The model code is unchanged and never sees a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts import ExpertBank
from moekit.layer import MoE
from moekit.parallel.all_to_all import AllToAllPath, GroupStatsPath


class ShardedExpertBank(ExpertBank):
    """This rank's experts [offset, offset + L) of an E-expert bank: the same stacked layout."""

    def __init__(self, config: MoEConfig, rank: int, world_size: int) -> None:
        # Built on meta: the weights are copied in from the full bank right after.
        with torch.device("meta"):
            super().__init__(config, num_local_experts=config.num_experts // world_size)
        self.num_global_experts = config.num_experts
        self.expert_offset = rank * self.num_experts

    def local_slice(self, full_E: Tensor) -> Tensor:
        """This rank's rows of a tensor whose first dimension is the global expert index."""
        if full_E.shape[0] != self.num_global_experts:
            raise ValueError(
                f"expected a tensor with {self.num_global_experts} experts in dim 0, "
                f"got shape {tuple(full_E.shape)}"
            )
        return full_E[self.expert_offset : self.expert_offset + self.num_experts]


def _shard_layer(moe: MoE, group: dist.ProcessGroup, stats_group: dist.ProcessGroup | None) -> None:
    cfg = moe.config
    world = dist.get_world_size(group)
    # validates divisibility
    path = AllToAllPath(group, cfg.num_experts, stats_group, reference=cfg.impl == "reference")
    full = moe.experts
    bank = ShardedExpertBank(cfg, path.rank, world)
    for name, param in full.named_parameters():
        local = bank.local_slice(param.detach()).clone()
        setattr(bank, name, nn.Parameter(local, requires_grad=param.requires_grad))
    moe.experts = bank
    moe.path = path


def apply_expert_parallel(
    module: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    stats_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Shard the experts of every MoE layer in `module` (a model or one MoE) over `group`.

    Each rank keeps experts [rank*E/W, (rank+1)*E/W) and reaches the others by all-to-all.
    Every rank must call this with the same module weights (same seed or checkpoint).
    Each rank then feeds its own tokens and gets its own tokens' outputs; balancing
    statistics are summed over the group.

    Capacity (capacity_factor) and the expert_choice router decide per rank, over the
    rank's own tokens, as GShard's groups do; dropless token-choice routing equals one
    process fed the concatenation of the ranks' batches.

    Args:
        module: an nn.Module containing MoE layers, modified in place.
        group: process group; None = the default (world) group.
        stats_group: where balancing statistics are summed; None = group. With data
            parallelism beside expert parallelism, pass the whole world so the losses are
            those of the global batch.

    Returns:
        module itself.

    Raises:
        ValueError: if a layer's num_experts is not divisible by the group size, if the
            module holds no MoE layer, or if it is already expert-parallel.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel needs an initialised torch.distributed group")
    for name, value in (("group", group), ("stats_group", stats_group)):
        if value is not None and not isinstance(value, dist.ProcessGroup):
            raise TypeError(
                f"{name} must be a torch.distributed ProcessGroup or None, "
                f"got {type(value).__name__} {value!r:.100}"
            )
    group = group if group is not None else dist.group.WORLD
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError(f"module {type(module).__name__} contains no MoE layer to shard")
    world = dist.get_world_size(group)
    for moe in layers:
        if isinstance(moe.experts, ShardedExpertBank):
            raise ValueError("module is already expert-parallel")
        if moe.config.num_experts % world:
            raise ValueError(
                f"num_experts ({moe.config.num_experts}) must be divisible by the "
                f"expert-parallel group size, got group size {world}"
            )
    for moe in layers:
        _shard_layer(moe, group, stats_group)
    return module


def share_balancing_stats(module: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Sum the balancing statistics of every (local) MoE layer over `group`.

    For plain data parallelism: each rank keeps all experts, while the balancing losses,
    the tokens per expert and so the bias update all see the global batch.
    """
    for moe in (m for m in module.modules() if isinstance(m, MoE)):
        if isinstance(moe.path, AllToAllPath):
            moe.path.stats_group = group
        else:
            moe.path = GroupStatsPath(moe.path, group)
    return module


def sharded_banks(module: nn.Module) -> dict[str, ShardedExpertBank]:
    """Expert-parallel banks by module name ('' prefix rules as module.named_modules)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, ShardedExpertBank)}


def expert_parameter_names(module: nn.Module) -> set[str]:
    """Names (as in module.named_parameters) of the parameters that are sharded over ranks."""
    names = set()
    for prefix, bank in sharded_banks(module).items():
        for name, _ in bank.named_parameters():
            names.add(f"{prefix}.{name}" if prefix else name)
    return names
