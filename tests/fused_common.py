"""The per-expert definition the fused expert loop is tested against (test_fused_*.py).

Shapes: T tokens, D model dim, A assignments grouped by expert.
"""

from __future__ import annotations

import torch

from moekit.experts import ExpertBank


def reference_combined(
    bank: ExpertBank, x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, counts
) -> torch.Tensor:
    """sum_a weight[a] * expert_a(x[rows[a]]) into [T, D]: ExpertBank.forward_expert with
    plain autograd gather and index_add (the reference path's arithmetic)."""
    out = x.new_zeros(x.shape)
    for e, (r, w) in enumerate(zip(rows.split(counts), weight.split(counts), strict=True)):
        if len(r):
            out = out.index_add(0, r, bank.forward_expert(e, x[r]) * w[:, None])
    return out
