"""Expert paths: how routed assignments reach the experts and come back, on one process.

Shapes: T tokens, D model dim, E experts, A assignments.

`ReferencePath` is the readable truth: for each expert, gather its tokens, run it, add
the weighted result. `GroupedPath` is the fast path: one stable sort by expert, then on CUDA
one gather, all experts as grouped GEMMs and one weighted scatter-add (the reference loop
for the dtypes grouped_mm lacks, float64); on CPU one fused loop over experts that gathers,
computes and scatters expert by expert. Both are tested equal,
forward and backward. Expert parallelism (moekit.parallel) swaps in a path of its own.

A path also says how to sum statistics over the processes that share its experts
(`group_sum`); on one process that is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.dispatch import permute, sort_by_expert, unpermute
from moekit.experts import ExpertBank, compute_dtype
from moekit.router import Routing


class ReferencePath:
    """A plain loop over experts."""

    collective_stats = False
    """Whether group_sum is a collective (then every statistic is computed eagerly)."""

    def __call__(self, x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
        return reference_experts(x_TD, routing.token_A, routing.expert_A, routing.weight_A, experts)

    def group_sum(self, t: Tensor) -> Tensor:
        return t


class GroupedPath(ReferencePath):
    """Sort by expert, run every expert on its rows, scatter back weighted."""

    def __call__(self, x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
        if needs_reference(x_TD, routing, experts):
            return super().__call__(x_TD, routing, experts)
        perm = sort_by_expert(routing.expert_A, experts.num_experts)
        if experts.uses_grouped_mm(x_TD):
            x_AD = permute(x_TD, routing.token_A, perm)
            y_AD = experts.forward_grouped(x_AD, perm.counts_E)
            return unpermute(y_AD, routing.token_A, routing.weight_A, perm, x_TD.shape[0])
        if x_TD.is_cuda:
            # Dtypes grouped_mm lacks (float64; see ExpertBank.uses_grouped_mm): the
            # reference loop, which every dtype handles as nn.Linear does.
            return super().__call__(x_TD, routing, experts)
        # Off CUDA the gather and the weighted scatter live inside the expert loop: no
        # [A, D] copy of the inputs or outputs is ever kept for backward.
        rows_A = routing.token_A.index_select(0, perm.order_A)
        weight_A = routing.weight_A.index_select(0, perm.order_A)
        return experts.forward_combined(x_TD, rows_A, weight_A, perm.counts_E)


def reference_experts(
    x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, experts: ExpertBank
) -> Tensor:
    """The reference loop: for each expert, gather its tokens' rows, run it, and add the
    weighted result back into those rows (also the local loop of moekit.parallel)."""
    # In the experts' dtype: under autocast that is the lower precision, as in the
    # grouped path, and index_add needs one dtype on both sides.
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=compute_dtype(x_TD))
    for e in range(experts.num_experts):
        sel_A = (expert_A == e).nonzero().squeeze(1)
        if sel_A.numel() == 0:
            continue
        tokens = token_A[sel_A]
        out = experts.forward_expert(e, x_TD[tokens])
        weight = weight_A[sel_A].to(out.dtype)
        y_TD = y_TD.index_add(0, tokens, out * weight[:, None])
    if expert_A.numel() == 0:
        # No assignments (zero real tokens, or capacity dropped them all): tie y to the
        # weights, the router's combine weights and x so their gradients are zeros
        # rather than None, as the grouped path's are; optimizers need them present.
        # Empty sums are exactly 0, where x * 0 would turn an inf in x into NaN.
        tie = sum(w.sum() for w in experts.parameters()) * 0
        y_TD = y_TD + (tie + weight_A.sum() + x_TD[:0].sum())
    return y_TD


def needs_reference(x_TD: Tensor, routing: Routing, experts: ExpertBank) -> bool:
    """Whether this call needs the reference loop's plain autograd ops: under a torch.func
    transform, or with forward-mode tangents (the fast paths have neither)."""
    return _under_torch_func() or has_tangent(x_TD, routing.weight_A, *experts.parameters())


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, ...) is tracing this call.

    They need autograd Functions written with setup_context, which the fused CPU loop is
    not (its forward keeps buffers of its own): the reference loop runs there instead.
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def has_tangent(*tensors: Tensor) -> bool:
    """Whether forward-mode AD (torch.autograd.forward_ad) carries a tangent on any input:
    the fused CPU loop has no forward derivative, the reference loop's ops all do."""
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(unpack(t).tangent is not None for t in tensors)


PATHS = {"reference": ReferencePath, "grouped": GroupedPath}
