"""Autograd-aware collectives for expert parallelism.

Shapes: N rows exchanged, D model dim; W ranks in the group.

Each rank runs backward on its own loss, so what distributed autograd differentiates is
the *sum* of the ranks' losses. The adjoints below are exact for that sum: the adjoint
of a variable-split all-to-all is the all-to-all with the splits swapped, and the adjoint
of a sum all-reduce is a sum all-reduce of the incoming gradients (a statistic that every
rank uses feeds every rank's loss). How the sum becomes a mean is the data-parallel
layer's business (moekit.parallel.context).

Written out rather than taken from torch.distributed.nn so the zero-row cases (a rank
that sends nothing, a group with no rows at all) and non-contiguous inputs are handled
in one place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function


def _all_to_all_rows(
    x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(
        out,
        x_ND.contiguous(),
        output_split_sizes=recv_splits,
        input_split_sizes=send_splits,
        group=group,
    )
    return out


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):  # type: ignore[override]
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all_rows(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        grad = _all_to_all_rows(grad_ND, ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad, None, None, None


class _AllReduceSum(Function):
    @staticmethod
    def forward(ctx, t, group):  # type: ignore[override]
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_to_all(
    x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> Tensor:
    """Send rows x_ND[split r] to rank r; returns the rows received, ordered by source rank.

    send_splits[r] rows go to rank r; recv_splits[r] rows arrive from rank r (both of
    length W, zeros allowed). Differentiable: gradients travel the reverse route.
    """
    return _AllToAll.apply(x_ND, send_splits, recv_splits, group)


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum of t over the group, differentiable (the gradient is summed over the group too)."""
    if t.requires_grad:
        return _AllReduceSum.apply(t, group)
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def exchange_counts(send_RL: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Row counts: send_RL[r, l] rows go to rank r's local expert l; returns recv_RL.

    recv_RL[r, l] is how many rows rank r sends to this rank's local expert l.
    """
    send = send_RL.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv
