"""ParallelContext: expert parallelism composed with data parallelism, for the training loop.

Layout: W ranks in the world, split into W/N expert-parallel groups of N consecutive
ranks (N = --expert-parallel). Inside a group each rank holds E/N experts; the
non-expert weights are replicated on every rank and averaged by DistributedDataParallel.
Ranks at the same place in different groups hold the same experts (an "expert
data-parallel" group of W/N ranks).

Gradient scaling. Every rank runs backward on its own loss L_r = CE(local rows) + aux,
so distributed autograd (exact adjoints in moekit.parallel.collectives) differentiates
G = sum_r L_r. The single-process objective on the global batch is the mean, G / W
(equal local batch sizes). Then:
- a replicated weight's local gradient is its share of dG; DDP sums over the W ranks
  and divides by W: d(G/W), as wanted;
- an expert weight's gradient on its owner already holds every contribution of its
  expert-parallel group (they arrive through the reverse all-to-all); summing over the
  expert data-parallel group adds the other groups, and dividing by W gives d(G/W).
So expert gradients are summed over the expert data-parallel group and divided by W
(not by the size of any one group) by a hook on each expert weight.

Balancing statistics (Switch loss, z-loss, tokens per expert and hence the bias update)
are summed over the whole world, not only the expert-parallel group: the Switch loss is a
product of batch means, so statistics of part of the batch would change the loss with
the layout. With them global, every layout trains like one process on the global batch.
"""

from __future__ import annotations

import datetime
import inspect
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.layer import MoE
from moekit.parallel import state
from moekit.parallel.expert_parallel import (
    apply_expert_parallel,
    expert_parameter_names,
    share_balancing_stats,
)
from moekit.parallel.process_group import close_distributed, init_distributed


class ParallelContext:
    """What a training loop on several processes needs; it never calls torch.distributed.

    Args:
        expert_parallel: N, ranks per expert-parallel group; None = the whole world,
            1 = plain data parallelism with every expert on every rank. Must divide
            the world size.
        backend: "gloo", "nccl" or None (nccl with CUDA, else gloo).
        init_timeout_s: how long to wait for every rank to join.
        timeout_s: how long a collective may block; a dead peer fails the step by then.
    """

    def __init__(
        self,
        expert_parallel: int | None = None,
        *,
        backend: str | None = None,
        init_timeout_s: float = 120.0,
        timeout_s: float = 300.0,
    ) -> None:
        self._owns_group = not dist.is_initialized()
        env = init_distributed(backend, init_timeout_s=init_timeout_s, timeout_s=timeout_s)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = env.local_rank
        self.local_world_size = env.local_world_size
        N = self.world_size if expert_parallel is None else expert_parallel
        if not isinstance(N, int) or isinstance(N, bool) or N < 1 or self.world_size % N:
            raise ValueError(
                f"expert_parallel must be a positive divisor of the world size "
                f"({self.world_size}), got {expert_parallel!r}"
            )
        self.expert_parallel = N
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        # Every rank creates every group, in the same order (new_group is collective).
        # Each with timeout_s: a group takes torch's default (30 min) otherwise, and the
        # MoE's collectives all run on these.
        timeout = datetime.timedelta(seconds=timeout_s)
        self.ep_group = self.expert_dp_group = None
        for start in range(0, self.world_size, N):
            group = dist.new_group(list(range(start, start + N)), timeout=timeout)
            if start <= self.rank < start + N:
                self.ep_group = group
        replicas = self.world_size // N
        for offset in range(N):
            group = dist.new_group([offset + k * N for k in range(replicas)], timeout=timeout)
            if self.rank % N == offset:
                self.expert_dp_group = group
        # Balancing statistics over the whole world, so the losses are the global batch's
        # whatever the layout; a group of its own keeps these collectives, issued inside
        # backward, apart from DDP's on the default group.
        self.stats_group = dist.new_group(list(range(self.world_size)), timeout=timeout)
        self._model: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files and logs."""
        return self.rank == 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make rank 0's weights everyone's, shard the experts, wrap for data parallelism.

        `model` is changed in place (it keeps the local experts) and stays the object to
        build the optimizer on, save and update; the returned module is the one to call.
        """
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)
        if self.expert_parallel > 1 and any(isinstance(m, MoE) for m in model.modules()):
            apply_expert_parallel(model, self.ep_group)
        if self.world_size > self.expert_parallel:
            share_balancing_stats(model, self.stats_group)
        expert_names = expert_parameter_names(model)
        for name, p in model.named_parameters():
            if name in expert_names and p.requires_grad:
                p.register_hook(self._expert_grad_hook)
        self._model = model
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_names))
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (RoPE tables, the router bias) are equal on every rank by construction
        # and by the group-summed bias update: no per-step broadcast. torch 2.13 names the
        # switch forward_sync_buffers; earlier releases call it broadcast_buffers.
        params = inspect.signature(DDP.__init__).parameters
        no_sync = (
            "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        )
        return DDP(model, device_ids=device_ids, **{no_sync: False})

    def _expert_grad_hook(self, grad: Tensor) -> Tensor:
        if dist.get_world_size(self.expert_dp_group) > 1:
            grad = grad.clone()
            dist.all_reduce(grad, group=self.expert_dp_group)
        return grad / self.world_size

    def shard_batch(self, x_global: Tensor) -> Tensor:
        """This rank's rows of a global batch [B, ...]: rows [rank*B/W, (rank+1)*B/W)."""
        if not isinstance(x_global, Tensor) or x_global.dim() == 0:
            raise TypeError(
                f"x_global must be a tensor with a batch dimension, got {x_global!r:.100}"
            )
        B = x_global.shape[0]
        if B % self.world_size:
            raise ValueError(
                f"the global batch ({B} rows) must be divisible by the world size "
                f"({self.world_size})"
            )
        b = B // self.world_size
        return x_global[self.rank * b : (self.rank + 1) * b]

    def mean(self, value: Tensor) -> Tensor:
        """Mean of `value` over all ranks (for logging and validation; no gradient)."""
        t = torch.as_tensor(value).detach()
        out = t.to(self.device, torch.float64 if t.dtype == torch.float64 else torch.float32)
        out = out.clone()
        dist.all_reduce(out)
        return (out / self.world_size).to(t.device)

    def clip_grad_norm_(self, parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
        """Clip by the norm of the whole model's gradient, shards included; returns the norm.

        Replicated gradients are equal on every rank after data parallelism; expert
        gradients are split over the expert-parallel group, so their squares are summed
        over it. Every rank gets the same norm and the same clip factor.
        """
        params = [p for p in parameters if p.grad is not None]
        expert_ids = self._expert_param_ids()
        sq = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(2)]
        for p in params:
            sq[id(p) in expert_ids] += p.grad.detach().double().square().sum().to(self.device)
        expert_sq = sq[1].clone()
        dist.all_reduce(expert_sq, group=self.ep_group)
        total = (sq[0] + expert_sq).sqrt()
        if math.isfinite(max_norm):
            factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.detach().mul_(factor.to(p.grad))
        return total.float()

    def _expert_param_ids(self) -> set[int]:
        if self._model is None:
            return set()
        names = expert_parameter_names(self._model)
        return {id(p) for n, p in self._model.named_parameters() if n in names}

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The unsharded state dict (a collective; call on every rank, save on the main)."""
        return state.full_state_dict(_unwrap(model), self.ep_group)

    def load_state_dict(self, model: nn.Module, full_state: dict[str, Tensor]) -> None:
        """Load an unsharded state dict; each rank keeps its experts."""
        state.load_full_state_dict(_unwrap(model), full_state)

    def full_optimizer_state(self, model: nn.Module, tensors: dict[str, Tensor]) -> dict:
        """Gather per-parameter optimizer tensors keyed 'optim.<param>.<field>' (collective)."""
        return state.full_named_state(_unwrap(model), tensors, self.ep_group)

    def shard_optimizer_state(self, model: nn.Module, tensors: dict[str, Tensor]) -> dict:
        """This rank's slice of optimizer tensors written by full_optimizer_state."""
        return state.shard_named_state(_unwrap(model), tensors)

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()

    def close(self) -> None:
        """Leave the process group if this context opened it."""
        if self._owns_group:
            close_distributed()


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model
