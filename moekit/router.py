"""Routers: score tokens against experts and choose who computes what.

Shapes: T tokens, D model dim, E experts, K experts per token, C tokens per expert,
A assignments (token, expert, weight) triples: A = T*K for token choice, E*C for expert choice.

Every router returns a `Routing` of flat assignments, so dispatch, capacity and expert
parallelism never need to know which router made them. Router arithmetic runs in float32
(float64 for float64 input) whatever the input dtype: bf16 logits collapse the top-k
margins and make ties common.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.dispatch import capacity


@dataclass
class Routing:
    """What a router decided for T tokens.

    expert_A, token_A, weight_A: one entry per (token, expert) assignment; weight_A is the
    combine weight (float32, or float64 for float64 input). score_A is the router's own
    score of the assignment, before renormalisation and scaling (a softmax probability or
    a sigmoid score): the probs drop policy keeps the highest, as a renormalised top-1
    weight is 1 for every token. slot_A is the choice rank of a token-choice assignment
    (0 = the token's first choice), used by the position drop policy.
    logits_TE: router logits (z-loss), in the same dtype. probs_TE: rows summing to 1, the
    router's distribution used by the balancing losses and entropy.
    """

    token_A: Tensor
    expert_A: Tensor
    weight_A: Tensor
    score_A: Tensor
    slot_A: Tensor
    logits_TE: Tensor
    probs_TE: Tensor

    def select(self, keep_A: Tensor) -> Routing:
        """The same routing with only the assignments where keep_A is True."""
        # One nonzero, then gathers: indexing each tensor by the mask would read the
        # number kept back to the host once per tensor (four synchronizations on CUDA).
        kept = keep_A.nonzero().squeeze(1)
        return Routing(
            self.token_A.index_select(0, kept),
            self.expert_A.index_select(0, kept),
            self.weight_A.index_select(0, kept),
            self.score_A.index_select(0, kept),
            self.slot_A.index_select(0, kept),
            self.logits_TE,
            self.probs_TE,
        )


def _softmax_experts(logits_TE: Tensor) -> Tensor:
    """Softmax over the experts; for a few experts on CPU, computed on the [E, T] transpose.

    torch's CPU softmax along a contiguous last dim of 8 is slow: softmax + top-2 fwd+bwd
    at [4096, 8] measured 883 us, 589 us through the transposed copy. From 16 experts on
    the plain kernel wins (542 vs 785 us at E=16, 1.8 vs 3.3 ms at E=64). The two agree
    to within an ulp.
    """
    if logits_TE.is_cuda or logits_TE.shape[-1] > 8:
        return logits_TE.softmax(dim=-1)
    return logits_TE.t().contiguous().softmax(dim=0).t()


def _scaled(weights: Tensor, factor: float) -> Tensor:
    # x * 1.0 is x exactly: the common factor 1 costs no op forward or backward.
    return weights if factor == 1.0 else weights * factor


def _from_topk(
    ids_TK: Tensor, weights_TK: Tensor, scores_TK: Tensor, logits_TE: Tensor, probs_TE: Tensor
) -> Routing:
    T, K = ids_TK.shape
    token_A = torch.arange(T, device=ids_TK.device).repeat_interleave(K)
    slot_A = torch.arange(K, device=ids_TK.device).repeat(T)
    return Routing(
        token_A,
        ids_TK.reshape(-1),
        weights_TK.reshape(-1),
        scores_TK.detach().reshape(-1),
        slot_A,
        logits_TE,
        probs_TE,
    )


class Router(nn.Module):
    """Base: a bias-free linear scorer `weight` [E, D] (the Hugging Face `gate.weight` layout)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 1/sqrt(D)) scores, and a selection bias of 0 where there is one (also
        after `to_empty`, as FSDP's deferred init and `MoE.reset_parameters` call it)."""
        nn.init.normal_(self.weight, std=self.config.d_model**-0.5)
        bias = getattr(self, "expert_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.zero_()

    def logits(self, x_TD: Tensor) -> Tensor:
        cfg = self.config
        # At least float32: bf16 logits collapse top-k margins; float64 stays float64.
        x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        if self.training and cfg.router_jitter > 0:
            # Switch Transformer: multiplicative input jitter for exploration.
            noise = torch.empty_like(x_TD).uniform_(1 - cfg.router_jitter, 1 + cfg.router_jitter)
            x_TD = x_TD * noise
        weight = self.weight.to(x_TD.dtype)
        # Autocast would run the matmul in bf16, whatever the inputs' dtype.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD, weight)
        if self.training and cfg.router_noise > 0:
            # Noisy top-k gating (Shazeer et al. 2017), fixed-std variant.
            logits_TE = logits_TE + torch.randn_like(logits_TE) * cfg.router_noise
        return logits_TE

    def forward(self, x_TD: Tensor) -> Routing:
        raise NotImplementedError


class SoftmaxTopK(Router):
    """Softmax over all E experts, then top-k; optionally renormalise the k weights.

    Mixtral renormalises; Qwen-MoE and OLMoE make it the `norm_topk_prob` setting.
    """

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = _softmax_experts(logits_TE)
        scores_TK, ids_TK = probs_TE.topk(self.config.top_k, dim=-1)
        weights_TK = scores_TK
        if self.config.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = _scaled(weights_TK, self.config.routed_scaling_factor)
        return _from_topk(ids_TK, weights_TK, scores_TK, logits_TE, probs_TE)


class TopKSoftmax(Router):
    """Top-k on the logits, then softmax over the k chosen (the original Mixtral code).

    Equal to softmax_topk with renormalisation, but it never forms the full softmax
    for the combine weights; the full softmax is still computed for the balancing loss.
    """

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        top_logits_TK, ids_TK = logits_TE.topk(self.config.top_k, dim=-1)
        weights_TK = _scaled(top_logits_TK.softmax(dim=-1), self.config.routed_scaling_factor)
        probs_TE = _softmax_experts(logits_TE)
        return _from_topk(ids_TK, weights_TK, probs_TE.gather(1, ids_TK), logits_TE, probs_TE)


class SigmoidBias(Router):
    """DeepSeek-V3: sigmoid scores, auxiliary-loss-free balancing by a selection-only bias.

    The bias `expert_bias` [E] shifts which experts are *chosen* but never the combine
    weights; `update_bias` nudges it from observed load (Wang et al. 2024). With
    num_groups > 1, each token first keeps its `topk_groups` best groups (a group scores
    the sum of its top-2 biased scores, as DeepSeek-V3 does) and picks top-k inside them.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        # Float32 even in a bf16 model: the bias moves in steps far below bf16 resolution.
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x_TD: Tensor) -> Routing:
        cfg = self.config
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE.detach() + self.expert_bias
        if cfg.num_groups > 1:
            T = choice_TE.shape[0]
            grouped = choice_TE.view(T, cfg.num_groups, cfg.experts_per_group)
            top2 = min(2, cfg.experts_per_group)
            group_scores = grouped.topk(top2, dim=-1).values.sum(dim=-1)
            group_ids = group_scores.topk(cfg.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
            group_mask.scatter_(1, group_ids, True)
            expert_mask = group_mask.repeat_interleave(cfg.experts_per_group, dim=1)
            choice_TE = choice_TE.masked_fill(~expert_mask, float("-inf"))
        ids_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
        weights_TK = chosen_TK = scores_TE.gather(1, ids_TK)
        if cfg.norm_topk_prob:
            # The epsilon guards all-zero sigmoid scores, which underflow in float32.
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = _scaled(weights_TK, cfg.routed_scaling_factor)
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return _from_topk(ids_TK, weights_TK, chosen_TK, logits_TE, probs_TE)

    def _apply(self, fn, recurse=True):
        # Module.to(torch.bfloat16) casts every floating buffer; the bias keeps at least
        # float32 (see __init__), restored from its values before the cast, not after.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        keep = torch.promote_types(self.expert_bias.dtype, torch.float32)
        if self.expert_bias.dtype != keep:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=keep)
        return self

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor) -> None:
        """bias += rate * sign(mean load - load): underloaded experts become likelier."""
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)


class ExpertChoice(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax score.

    C = ceil(capacity_factor * T * K / E) with capacity_factor defaulting to 1, capped at T.
    A token may be taken by several experts or by none; every expert is exactly full.
    """

    def capacity(self, num_tokens: int) -> int:
        cfg = self.config
        factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        return min(num_tokens, capacity(num_tokens, cfg.top_k, cfg.num_experts, factor))

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = _softmax_experts(logits_TE)
        C = self.capacity(x_TD.shape[0])
        E = self.config.num_experts
        weights_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        expert_A = torch.arange(E, device=x_TD.device).repeat_interleave(C)
        weights_A = _scaled(weights_EC.reshape(-1), self.config.routed_scaling_factor)
        slot_A = torch.zeros_like(expert_A)
        scores_A = weights_EC.detach().reshape(-1)
        return Routing(
            token_EC.reshape(-1), expert_A, weights_A, scores_A, slot_A, logits_TE, probs_TE
        )


ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopK,
    "topk_softmax": TopKSoftmax,
    "sigmoid_bias": SigmoidBias,
    "expert_choice": ExpertChoice,
}
