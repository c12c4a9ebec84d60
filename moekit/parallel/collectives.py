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

from moekit.paths import has_tangent


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
    # setup_context, a backward made of this Function again and a jvp: both collectives
    # are linear, so their adjoints and tangents are collectives too, and a gradient
    # penalty (backward with create_graph=True), forward-mode AD and torch.func.grad run
    # through them as through the single-process layer.
    @staticmethod
    def forward(x_ND, send_splits, recv_splits, group):  # type: ignore[override]
        return _all_to_all_rows(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.send_splits, ctx.recv_splits, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        return all_to_all(grad_ND, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None

    @staticmethod
    def jvp(ctx, tangent_ND, *_):  # type: ignore[override]
        return _all_to_all_rows(tangent_ND, ctx.send_splits, ctx.recv_splits, ctx.group)


class _AllReduceSum(Function):
    @staticmethod
    def forward(t, group):  # type: ignore[override]
        return _all_reduce_copy(t, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return all_reduce_sum(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):  # type: ignore[override]
        return _all_reduce_copy(tangent, ctx.group)


def _all_reduce_copy(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


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
    if t.requires_grad or has_tangent(t):
        return _AllReduceSum.apply(t, group)
    return _all_reduce_copy(t, group)


def exchange_counts(send_RL: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Row counts: send_RL[r, l] rows go to rank r's local expert l; returns recv_RL.

    recv_RL[r, l] is how many rows rank r sends to this rank's local expert l.
    """
    send = send_RL.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv
