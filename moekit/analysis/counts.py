"""Routing counts of one MoE layer summed over many batches, and their summary.

Shapes: T tokens, E experts, N domains.

`LayerCounts.add(out, domain_of_token)` takes a layer's `MoEOutput` per batch; only
counts are kept (not per-token ids), so a whole validation split fits in a few [E, E]
and [N, E] tables. `summary()` turns them into the numbers of moekit.analysis.stats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from moekit.analysis import stats
from moekit.layer import MoEOutput


@dataclass(frozen=True)
class LayerSummary:
    """What a person wants to know about one MoE layer's routing over a dataset."""

    layer: int
    """Position of the layer among the model's MoE layers (0 = first)."""
    num_tokens: int
    """Real (non-padding) tokens routed."""
    tokens_per_expert: list[float]
    """Assignments each expert computed, summed over the dataset."""
    load_share: list[float]
    """tokens_per_expert divided by the total: each expert's share of the work."""
    imbalance: float
    """max / mean load: 1.0 is balanced; the slowdown of the busiest expert."""
    collapsed_imbalance: float
    """The imbalance of a collapsed router, every token on the same K experts: E / K.
    An expert serves a token at most once, so with top-K routing no layer goes past it."""
    cv: float
    """Coefficient of variation of the load (std / mean): 0 is balanced, sqrt(E/K - 1)
    collapsed."""
    load_entropy: float
    """Entropy of the load shares over log(E): 1 balanced, log(K) / log(E) collapsed."""
    dead_experts: list[int]
    """Experts with no assignment or under the dead threshold times their fair share."""
    router_entropy: float
    """Mean per-token entropy of the router distribution, in nats (log E is uniform)."""
    dropped_fraction: float
    """Share of assignments dropped by capacity over the dataset."""
    specialisation: float
    """I(domain; expert) / H(domain) in [0, 1]; NaN with fewer than two domains."""
    mutual_information: float
    """I(domain; expert) in nats."""
    domain_js: dict[str, float]
    """Jensen-Shannon divergence (bits) between each pair of domains' expert distributions."""

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None."""
        return _nan_to_none(asdict(self))


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


@dataclass
class LayerCounts:
    """Running totals of one layer's routing; see the module docstring."""

    num_experts: int
    domains: tuple[str, ...] = ()
    top_k: int = 1
    """Experts per token (the layer's config.top_k): where collapse lies (LayerSummary)."""
    tokens_per_expert: Tensor = field(init=False)
    co_selection: Tensor = field(init=False)
    domain_expert: Tensor = field(init=False)
    num_tokens: int = 0
    entropy_sum: float = 0.0
    routed: float = 0.0
    dropped: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {self.num_experts!r}")
        top_k = self.top_k
        if (
            isinstance(top_k, bool)
            or not isinstance(top_k, int)
            or not 1 <= top_k <= self.num_experts
        ):
            raise ValueError(f"top_k must be an int in [1, {self.num_experts}], got {top_k!r}")
        self.domains = tuple(self.domains)
        E, N = self.num_experts, len(self.domains)
        self.tokens_per_expert = torch.zeros(E, dtype=torch.float64)
        self.co_selection = torch.zeros(E, E, dtype=torch.float64)
        self.domain_expert = torch.zeros(N, E, dtype=torch.float64)

    def add(self, out: MoEOutput, num_tokens: int, domain_of_token: Tensor | None = None) -> None:
        """Add one batch: `out` from the layer, num_tokens real tokens in the batch.

        domain_of_token [T] (long, index into `domains`, negative = not counted) labels each
        flat input position; leave it None when there are no domains.
        """
        if out.tokens_per_expert.numel() != self.num_experts:
            raise ValueError(
                f"layer has {out.tokens_per_expert.numel()} experts, counts were made for "
                f"{self.num_experts}"
            )
        kept = stats.expert_counts(out.expert_ids, self.num_experts)
        self.tokens_per_expert += kept
        self.co_selection += stats.co_selection(out.token_ids, out.expert_ids, self.num_experts)
        if domain_of_token is not None and self.domains:
            self.domain_expert += stats.domain_expert_counts(
                out.token_ids, out.expert_ids, domain_of_token, len(self.domains), self.num_experts
            )
        self.num_tokens += int(num_tokens)
        # router_entropy is a mean over the batch's real tokens: weight it back by them.
        self.entropy_sum += float(out.router_entropy) * num_tokens
        kept_total = kept.sum().item()
        frac = float(out.dropped_fraction)
        routed = kept_total / (1 - frac) if frac < 1 else kept_total
        self.routed += routed
        self.dropped += routed - kept_total

    def summary(self, layer: int, dead_threshold: float = 0.0) -> LayerSummary:
        """The layer's statistics over everything added so far."""
        total = self.tokens_per_expert.sum().item()
        share = (self.tokens_per_expert / total if total else self.tokens_per_expert).tolist()
        names = self.domains
        js = {
            f"{names[i]}|{names[j]}": stats.js_divergence(
                self.domain_expert[i], self.domain_expert[j]
            )
            for i in range(len(names))
            for j in range(i + 1, len(names))
        }
        has_domains = len(names) > 1
        return LayerSummary(
            layer=layer,
            num_tokens=self.num_tokens,
            tokens_per_expert=self.tokens_per_expert.tolist(),
            load_share=share,
            imbalance=stats.load_imbalance(self.tokens_per_expert),
            collapsed_imbalance=self.num_experts / self.top_k,
            cv=stats.coefficient_of_variation(self.tokens_per_expert),
            load_entropy=stats.load_entropy(self.tokens_per_expert),
            dead_experts=stats.dead_experts(self.tokens_per_expert, dead_threshold),
            router_entropy=self.entropy_sum / self.num_tokens if self.num_tokens else math.nan,
            dropped_fraction=self.dropped / self.routed if self.routed else 0.0,
            specialisation=(
                stats.specialisation_score(self.domain_expert) if has_domains else math.nan
            ),
            mutual_information=(
                stats.mutual_information(self.domain_expert) if has_domains else math.nan
            ),
            domain_js=js,
        )
