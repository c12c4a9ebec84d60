"""Routing statistics: pure functions over which expert each token went to.

Shapes: T tokens, E experts, A assignments (token, expert) pairs, N domains (labels of
documents such as code or prose).

Everything here takes plain tensors (the `token_ids`/`expert_ids` of a `MoEOutput`, or
counts summed over many batches) and returns numbers a person can compare between layers
and models. Counting runs in float64: a validation pass sums millions of assignments, and
the information measures below subtract nearly equal entropies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _counts(name: str, counts: Tensor, dim: int) -> Tensor:
    if not isinstance(counts, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(counts.shape)}")
    counts = counts.detach().to(torch.float64)
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError(f"{name} must hold finite counts >= 0, got {counts.tolist()}")
    return counts


def _ids(name: str, ids: Tensor, bound: int | None = None) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        kind = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer tensor, got {kind}")
    ids = ids.detach().reshape(-1).long()
    if ids.numel() and (ids.min() < 0 or (bound is not None and ids.max() >= bound)):
        raise ValueError(f"{name} must lie in [0, {bound}), got values {ids.min()}..{ids.max()}")
    return ids


def expert_counts(expert_ids: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert: [E] float64 from expert_ids [A]."""
    ids = _ids("expert_ids", expert_ids, num_experts)
    return torch.bincount(ids.cpu(), minlength=num_experts).to(torch.float64)


def load_imbalance(tokens_per_expert: Tensor) -> float:
    """max / mean of the per-expert load: 1.0 is perfectly balanced; E / K when every token
    picks the same K experts (top-K routing never goes past it: E for top-1).

    This is the factor by which the busiest expert slows an expert-parallel step (it
    sets the capacity a dropless layer needs). NaN when there is no load at all.
    """
    load = _counts("tokens_per_expert", tokens_per_expert, 1)
    mean = load.mean().item()
    return load.max().item() / mean if mean > 0 else math.nan


def coefficient_of_variation(tokens_per_expert: Tensor) -> float:
    """Population std / mean of the per-expert load: 0 when balanced, sqrt(E/K - 1) when every
    token picks the same K experts."""
    load = _counts("tokens_per_expert", tokens_per_expert, 1)
    mean = load.mean().item()
    return load.std(correction=0).item() / mean if mean > 0 else math.nan


def load_entropy(tokens_per_expert: Tensor) -> float:
    """Entropy of the load distribution over experts divided by log(E): 1 balanced, log(K) /
    log(E) when every token picks the same K experts (0 for top-1)."""
    load = _counts("tokens_per_expert", tokens_per_expert, 1)
    E, total = load.numel(), load.sum().item()
    if total == 0:
        return math.nan
    if E == 1:
        return 1.0
    return _entropy(load / total).item() / math.log(E)


def dead_experts(tokens_per_expert: Tensor, threshold: float = 0.0) -> list[int]:
    """Experts that (almost) never compute: indices, ascending.

    An expert is dead when it received no assignment, or fewer than `threshold` times
    its uniform share (total / E). threshold=0.1 flags experts doing under a tenth of
    their fair share, which are dead weight in parameter count though not exactly idle.
    """
    if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    load = _counts("tokens_per_expert", tokens_per_expert, 1)
    fair = load.sum() / load.numel()
    dead = (load == 0) | (load < threshold * fair)
    return dead.nonzero().flatten().tolist()


def co_selection(token_ids: Tensor, expert_ids: Tensor, num_experts: int) -> Tensor:
    """How often two experts serve the same token: [E, E] float64 counts.

    Entry (i, j), i != j, counts tokens routed to both i and j; the diagonal counts tokens
    routed to i (its load). Symmetric. With top-1 routing the off-diagonal is zero.
    Sum these over batches: token ids are positions within one batch.
    """
    tokens = _ids("token_ids", token_ids)
    experts = _ids("expert_ids", expert_ids, num_experts)
    if tokens.shape != experts.shape:
        raise ValueError(
            f"token_ids and expert_ids must match, got {tuple(tokens.shape)} and "
            f"{tuple(experts.shape)}"
        )
    tokens, experts = tokens.cpu(), experts.cpu()
    if tokens.numel() == 0:
        return torch.zeros(num_experts, num_experts, dtype=torch.float64)
    # Compact token ids so the one-hot matrix has one row per routed token only.
    _, rows = torch.unique(tokens, return_inverse=True)
    onehot_TE = torch.zeros(int(rows.max()) + 1, num_experts, dtype=torch.float64)
    onehot_TE.index_put_((rows, experts), torch.ones_like(rows, dtype=torch.float64))
    return onehot_TE.t() @ onehot_TE


def co_selection_conditional(co_EE: Tensor) -> Tensor:
    """P(token also chose j | it chose i): rows of co-selection divided by their diagonal.

    The diagonal is set to 0 so a heatmap shows partners only; rows of unused experts are 0.
    """
    co = _counts("co_selection", co_EE, 2)
    load = co.diagonal().clone()
    cond = co / load.clamp(min=1)[:, None]
    cond.fill_diagonal_(0.0)
    return cond


def domain_expert_counts(
    token_ids: Tensor,
    expert_ids: Tensor,
    domain_of_token: Tensor,
    num_domains: int,
    num_experts: int,
) -> Tensor:
    """Assignments per (domain, expert): [N, E] float64.

    domain_of_token [T] gives each flat input position's domain label (the same indexing as
    MoEOutput.token_ids); a negative label leaves the token out (e.g. padding).
    """
    tokens = _ids("token_ids", token_ids)
    experts = _ids("expert_ids", expert_ids, num_experts)
    if not isinstance(domain_of_token, Tensor):
        raise TypeError(f"domain_of_token must be a tensor, got {type(domain_of_token).__name__}")
    domains = domain_of_token.detach().reshape(-1).long().cpu()
    if tokens.numel() and tokens.max() >= domains.numel():
        raise ValueError(
            f"token_ids reach {int(tokens.max())} but domain_of_token has {domains.numel()} entries"
        )
    if domains.numel() and domains.max() >= num_domains:
        raise ValueError(f"domain labels must be < num_domains={num_domains}, got {domains.max()}")
    dom_A = domains[tokens.cpu()]
    keep = dom_A >= 0
    counts = torch.zeros(num_domains, num_experts, dtype=torch.float64)
    counts.index_put_(
        (dom_A[keep], experts.cpu()[keep]),
        torch.ones(int(keep.sum()), dtype=torch.float64),
        accumulate=True,
    )
    return counts


def _entropy(p: Tensor) -> Tensor:
    """Entropy in nats along the last dim; 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), p.new_zeros(()))).sum(dim=-1)


def mutual_information(joint_counts: Tensor) -> float:
    """I(domain; expert) in nats from a joint count table [N, E] (e.g. domain_expert_counts).

    I = H(expert) - sum_d P(d) H(expert | d), which is also the Jensen-Shannon divergence
    of the domains' expert distributions weighted by the domains' shares (Lin 1991). A
    finite sample of a routing that ignores the domain still gives a small positive
    value, of order (N-1)(E-1) / (2 * assignments) (Miller 1955).
    """
    joint = _counts("joint_counts", joint_counts, 2)
    total = joint.sum()
    if total == 0:
        return math.nan
    p_NE = joint / total
    p_N, p_E = p_NE.sum(dim=1), p_NE.sum(dim=0)
    cond_NE = p_NE / p_N.clamp(min=1e-300)[:, None]
    return max(0.0, (_entropy(p_E) - (p_N * _entropy(cond_NE)).sum()).item())


def specialisation_score(joint_counts: Tensor) -> float:
    """Normalised specialisation in [0, 1]: I(domain; expert) / H(domain).

    0 when every domain uses the experts alike (including a perfectly uniform router); 1
    when the expert chosen reveals the domain exactly (each expert serves one domain). It
    answers "what share of the uncertainty about a token's domain do its experts remove?"
    and, unlike the raw mutual information, compares across domain mixes. NaN with fewer
    than two domains present.
    """
    joint = _counts("joint_counts", joint_counts, 2)
    total = joint.sum()
    if total == 0:
        return math.nan
    h_domain = _entropy(joint.sum(dim=1) / total).item()
    if h_domain <= 1e-12:
        return math.nan
    return min(1.0, mutual_information(joint) / h_domain)


def js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence of two distributions (or count vectors), in bits: 0..1.

    Use it on two domains' rows of domain_expert_counts: 1 means the domains never share
    an expert, 0 means they are routed identically.
    """
    p = _counts("p", p, 1)
    q = _counts("q", q, 1)
    if p.shape != q.shape:
        raise ValueError(f"p and q must match, got {tuple(p.shape)} and {tuple(q.shape)}")
    if p.sum() == 0 or q.sum() == 0:
        return math.nan
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    js = _entropy(m) - (_entropy(p) + _entropy(q)) / 2
    return max(0.0, js.item() / math.log(2))
