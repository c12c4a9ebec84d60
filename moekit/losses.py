"""Load-balancing losses, per layer, over real tokens only.

Shapes: T tokens (padding already removed), E experts, A assignments.

Each function takes a `group_sum` that sums a tensor over every process that shares
these experts (identity on one process), so that balancing is computed over the
whole expert-parallel group and does not depend on how many ranks there are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.dispatch import count_ids

GroupSum = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def switch_aux_loss(
    probs_TE: Tensor,
    expert_A: Tensor,
    num_experts: int,
    group_sum: GroupSum = _identity,
    counts_E: Tensor | None = None,
) -> Tensor:
    """Switch/GShard balancing loss: E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4).

    f_e is the fraction of assignments routed to e and P_e the mean router probability
    of e. f is normalised by the number of assignments (T*K), not tokens, so a perfectly
    uniform router scores exactly 1.0 for any K. Computed per layer: averaging the
    statistics of several layers before the product (a known bug elsewhere) lets one
    layer's imbalance cancel another's. counts_E [E], when given, is
    count_ids(expert_A, E), already computed by the caller.
    """
    if counts_E is None:
        counts_E = count_ids(expert_A, num_experts)
    counts_E = counts_E.to(probs_TE.dtype)
    # new_full fills on the device; new_tensor would copy from the host.
    totals = torch.stack([probs_TE.new_full((), float(probs_TE.shape[0])), counts_E.sum()])
    prob_sum_E = probs_TE.sum(dim=0)
    counts_E, totals, prob_sum_E = group_sum(counts_E), group_sum(totals), group_sum(prob_sum_E)
    # Totals are whole numbers: clamping at 1 changes nothing unless they are 0, where
    # counts and probability sums are 0 too and the loss is exactly 0 (with zero
    # gradients), without a host sync to test for it.
    f_E = counts_E / totals[1].clamp(min=1)
    P_E = prob_sum_E / totals[0].clamp(min=1)
    return num_experts * (f_E * P_E).sum()


def sequence_aux_loss(
    probs_TE: Tensor,
    expert_A: Tensor,
    token_A: Tensor,
    seq_T: Tensor,
    num_seqs: int,
    num_experts: int,
    top_k: int,
    group_sum: GroupSum = _identity,
    spans_group: bool = False,
) -> Tensor:
    """Sequence-level balancing loss (DeepSeek-V2 eq. 12; DeepSeek-V3 eq. 17-20).

    For each sequence s: sum_e f_se * P_se with f_se = E / (K * S_s) * count_se and
    P_se the mean probability of e over the sequence's S_s real tokens; averaged over
    sequences that have real tokens. A uniform router scores 1.0. Each sequence lives
    on one rank, so only the mean over sequences needs the group; with spans_group, every
    rank holds a part of the same num_seqs sequences (a [T, D] call is one sequence, and
    over several ranks their tokens together are it), so the sequences' counts,
    probability sums and lengths are summed over the group first.
    """
    E = num_experts
    dtype = probs_TE.dtype
    # Counts are integers, so counting (sequence, expert) pairs is exact.
    pair_A = seq_T.index_select(0, token_A) * E + expert_A
    counts_SE = count_ids(pair_A, num_seqs * E).to(dtype).view(num_seqs, E)
    prob_sum_SE = torch.zeros(num_seqs, E, dtype=dtype, device=probs_TE.device)
    prob_sum_SE = prob_sum_SE.index_add(0, seq_T, probs_TE)
    len_S = count_ids(seq_T, num_seqs).to(dtype)
    if spans_group:
        counts_SE, prob_sum_SE, len_S = (
            group_sum(counts_SE),
            group_sum(prob_sum_SE),
            group_sum(len_S),
        )
    present = len_S > 0
    len_S = len_S.clamp(min=1)
    f_SE = counts_SE * (E / top_k) / len_S[:, None]
    P_SE = prob_sum_SE / len_S[:, None]
    per_seq = (f_SE * P_SE).sum(dim=-1) * present
    if spans_group:  # already the group's sequences, equal on every rank
        return per_seq.sum() / present.sum().to(dtype).clamp(min=1)
    totals = group_sum(torch.stack([per_seq.sum(), present.sum().to(dtype)]))
    return totals[0] / totals[1].clamp(min=1)


def z_loss(logits_TE: Tensor, group_sum: GroupSum = _identity) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean of logsumexp(logits)^2."""
    # Token counts below are made with new_full (a fill on the device): new_tensor would
    # copy from the host, a synchronization on CUDA.
    sq = logits_TE.logsumexp(dim=-1).square()
    totals = group_sum(torch.stack([sq.sum(), sq.new_full((), float(sq.shape[0]))]))
    return totals[0] / totals[1].clamp(min=1)


def router_entropy(probs_TE: Tensor, group_sum: GroupSum = _identity) -> Tensor:
    """Mean entropy (nats) of the router distribution; log(E) is uniform, 0 is one-hot."""
    with torch.no_grad():
        ent = -(probs_TE * probs_TE.clamp(min=1e-30).log()).sum(dim=-1)
        totals = group_sum(torch.stack([ent.sum(), ent.new_full((), float(ent.shape[0]))]))
        return totals[0] / totals[1].clamp(min=1)
