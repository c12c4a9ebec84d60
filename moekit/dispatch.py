"""Dispatch: group assignments by expert (permute), enforce capacity, and scatter back.

Shapes: T tokens, D model dim, E experts, A assignments, C capacity per expert.

Pure functions on tensors, shared by the local fast path and by expert parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Permutation:
    """Assignments sorted by expert: order_A maps sorted position -> assignment index."""

    order_A: Tensor
    counts_E: Tensor

    @property
    def counts(self) -> list[int]:
        return self.counts_E.tolist()


def count_ids(ids: Tensor, n: int) -> Tensor:
    """[n] int64: how often each of 0..n-1 occurs in ids (every id must lie in [0, n)).

    torch.bincount on CUDA reads the ids' minimum and maximum back to the host to size its
    output: two synchronizations per call, each draining the stream so that the host can
    no longer queue work ahead of the GPU (eight per MoE forward before this helper). A
    scatter-add of ones into n zeros needs none; integer sums are exact in any order. On
    CPU, where there is no stream to drain, bincount is the faster of the two, except
    under torch.compile: an output sized by the data breaks the graph.
    """
    if ids.is_cuda or torch.compiler.is_compiling():
        return scatter_count(ids, n)
    return torch.bincount(ids, minlength=n)


def scatter_count(ids: Tensor, n: int) -> Tensor:
    """count_ids's arithmetic on CUDA, on any device (tests check it against bincount)."""
    counts = torch.zeros(n, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def sort_by_expert(expert_A: Tensor, num_experts: int) -> Permutation:
    """A stable sort of assignments by expert id, with the number per expert.

    Stable so that, within an expert, assignments keep token order: results are
    deterministic and identical to the reference loop's order of accumulation.
    """
    order_A = torch.sort(expert_A, stable=True).indices
    counts_E = count_ids(expert_A, num_experts)
    return Permutation(order_A, counts_E)


def permute(x_TD: Tensor, token_A: Tensor, perm: Permutation) -> Tensor:
    """Rows of x for each assignment, grouped by expert: [A, D]."""
    return x_TD.index_select(0, token_A.index_select(0, perm.order_A))


def unpermute(
    y_AD: Tensor, token_A: Tensor, weight_A: Tensor, perm: Permutation, num_tokens: int
) -> Tensor:
    """Weighted sum of expert outputs back into token order: y_TD[t] = sum_a w_a * y_a."""
    token_sorted = token_A.index_select(0, perm.order_A)
    w_sorted = weight_A.index_select(0, perm.order_A).to(y_AD.dtype)
    out = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out.index_add(0, token_sorted, y_AD * w_sorted[:, None])


def inverse(order_A: Tensor) -> Tensor:
    """The inverse of a permutation: inverse(p)[p[i]] = i."""
    inv = torch.empty_like(order_A)
    inv[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    return inv


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert: ceil(cf * T * K / E), the GShard/Switch definition (>= 1 when
    there are tokens)."""
    exact = capacity_factor * num_tokens * top_k / num_experts
    # Decimal factors are inexact in binary: 0.07 * 25 * 4 is 7.000000000000001, whose
    # ceil would be 8. A product within rounding error of a positive integer is that
    # integer; a tiny positive product is not 0, which would drop every assignment.
    nearest = round(exact)
    if nearest >= 1 and abs(exact - nearest) <= 1e-9 * exact:
        return nearest
    return math.ceil(exact)


def capacity_keep(
    expert_A: Tensor,
    score_A: Tensor,
    slot_A: Tensor,
    token_A: Tensor,
    num_experts: int,
    cap: int,
    policy: str,
) -> Tensor:
    """Which assignments fit: each expert keeps at most `cap`, by policy.

    probs: highest router score first (Routing.score_A: the probability or sigmoid score
        before renormalisation; ties by token order).
    position: first choices before second choices (GShard), then earlier tokens first.
    """
    if policy == "probs":
        # Sort keys from least to most significant, each sort stable.
        order = torch.argsort(token_A, stable=True)
        order = order[torch.argsort(-score_A.detach()[order], stable=True)]
    elif policy == "position":
        order = torch.argsort(token_A, stable=True)
        order = order[torch.argsort(slot_A[order], stable=True)]
    else:
        raise ValueError(f"drop_policy must be 'probs' or 'position', got {policy!r}")
    order = order[torch.argsort(expert_A[order], stable=True)]
    counts_E = count_ids(expert_A, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts_E[expert_A[order]]
    keep = torch.empty_like(expert_A, dtype=torch.bool)
    keep[order] = rank_sorted < cap
    return keep
