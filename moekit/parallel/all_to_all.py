"""The all-to-all expert path: each rank holds E/W experts and exchanges tokens with the rest.

Shapes: T tokens, D model dim, E experts, L local experts per rank (E / W), W ranks,
A assignments made on this rank, N rows received by this rank's experts.

One MoE call, on every rank of the expert-parallel group:
1. sort this rank's assignments by global expert id; since rank r owns experts
   [r*L, (r+1)*L), the sorted rows are already contiguous per destination rank;
2. exchange the per-(rank, local expert) counts, then the rows (variable-split
   all-to-all);
3. regroup the received rows (ordered by source rank, then local expert) by local
   expert, stably, so each expert sees its rows in global token order: rank 0's tokens,
   then rank 1's, ... exactly the order of one process fed the concatenated batch;
4. run the local experts (grouped GEMMs on CUDA, the fused expert loop elsewhere; the
   reference loop for impl="reference", under torch.func and with forward-mode
   tangents, as on one process), undo the regrouping, send the rows back by the reverse
   all-to-all, and combine with the router weights on the source rank.
The router, the combine weights and the balancing losses never leave their rank; only
the statistics the losses need are summed over the group (`group_sum`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moekit.dispatch import inverse, permute, sort_by_expert, unpermute
from moekit.experts import ExpertBank
from moekit.parallel.collectives import all_reduce_sum, all_to_all, exchange_counts
from moekit.paths import needs_reference, reference_experts
from moekit.router import Routing


class AllToAllPath:
    """Runs routed assignments on experts sharded over a process group.

    Args:
        group: the expert-parallel process group (W ranks).
        num_experts: E, the global number of experts; W must divide it.
        stats_group: where the balancing statistics are summed; None = group. A wider
            group (the whole data-parallel world) makes the losses those of the global
            batch: the Switch loss is a product of batch means, so per-group statistics
            would give a different loss for each way of splitting the batch.
        reference: run the local experts as the reference loop does, expert by expert
            with plain autograd ops (the layer's impl="reference": for second
            derivatives).
    """

    collective_stats = True
    """group_sum is an all-reduce: every rank computes every statistic, in one order."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        stats_group: dist.ProcessGroup | None = None,
        reference: bool = False,
    ) -> None:
        world = dist.get_world_size(group)
        if num_experts % world:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel "
                f"group size, got group size {world}"
            )
        self.group = group
        self.stats_group = stats_group if stats_group is not None else group
        self.world_size = world
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // world
        self.reference = reference

    def __call__(self, x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
        W, L = self.world_size, self.num_local_experts
        if experts.num_experts != L:
            raise ValueError(
                f"expert bank holds {experts.num_experts} experts, expected {L} local experts "
                f"(E={self.num_experts} over {W} ranks)"
            )
        perm = sort_by_expert(routing.expert_A, self.num_experts)
        x_AD = permute(x_TD, routing.token_A, perm)
        send_RL = perm.counts_E.view(W, L)
        recv_RL = exchange_counts(send_RL, self.group)
        send_splits = send_RL.sum(dim=1).tolist()
        recv_splits = recv_RL.sum(dim=1).tolist()

        x_ND = all_to_all(x_AD, send_splits, recv_splits, self.group)
        local_N = torch.arange(L, device=x_ND.device).repeat(W)
        local_N = local_N.repeat_interleave(recv_RL.reshape(-1))
        order_N = torch.sort(local_N, stable=True).indices
        counts_L = recv_RL.sum(dim=0)
        if self.reference or needs_reference(x_TD, routing, experts):
            # Unit weights: each received row is one assignment, its own "token".
            rows_N = torch.arange(x_ND.shape[0], device=x_ND.device)
            y_ND = reference_experts(x_ND, rows_N, local_N, x_ND.new_ones(rows_N.shape), experts)
        elif experts.uses_grouped_mm(x_ND):
            y_ND = experts.forward_grouped(x_ND.index_select(0, order_N), counts_L)
            y_ND = y_ND.index_select(0, inverse(order_N))
        else:
            # Off CUDA the regrouping gather and its inverse scatter (unit weights: each
            # received row is one assignment) run inside the fused expert loop, which
            # keeps no [N, D] copies for backward.
            y_ND = experts.forward_combined(x_ND, order_N, x_ND.new_ones(order_N.shape), counts_L)
        y_AD = all_to_all(y_ND, recv_splits, send_splits, self.group)
        return unpermute(y_AD, routing.token_A, routing.weight_A, perm, x_TD.shape[0])

    def group_sum(self, t: Tensor) -> Tensor:
        """Sum over the statistics group; gradients are summed back to every rank."""
        return all_reduce_sum(t, self.stats_group)


class GroupStatsPath:
    """A local path (every expert on this rank) whose balancing statistics span a group.

    For data parallelism without expert parallelism: the experts run locally, the
    losses see the whole global batch.
    """

    collective_stats = True
    """group_sum is an all-reduce: every rank computes every statistic, in one order."""

    def __init__(self, local_path, stats_group: dist.ProcessGroup) -> None:
        self.local_path = local_path
        self.stats_group = stats_group

    def __call__(self, x_TD: Tensor, routing: Routing, experts: ExpertBank) -> Tensor:
        return self.local_path(x_TD, routing, experts)

    def group_sum(self, t: Tensor) -> Tensor:
        return all_reduce_sum(t, self.stats_group)
