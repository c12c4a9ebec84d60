"""Parameter and FLOP counts from a config alone.

Parameter counts build the model on the `meta` device (shapes, no memory), so they are
exact for any preset, including the 671B one, and cannot drift from the model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.model.config import ModelConfig


def _build_meta(config: ModelConfig) -> nn.Module:
    from moekit.model.transformer import Transformer

    with torch.device("meta"):
        return Transformer(config)


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts.

    Active counts what one token touches: everything except the routed experts it is
    not sent to, i.e. each MoE layer's expert bank counts experts_per_token / num_experts
    of its size, top_k / num_experts but under expert choice (embeddings, lm_head,
    routers and shared experts count in full; tied embeddings count once).
    """
    model = _build_meta(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        bank = sum(p.numel() for p in moe.experts.parameters())
        E, K = moe.config.num_experts, moe.config.experts_per_token
        inactive += round(bank / E * (E - K))
    return total, total - inactive


def expert_parameters(config: ModelConfig) -> int:
    """Parameters of the routed experts, all MoE layers: what expert parallelism shards."""
    return sum(
        p.numel() for moe in _build_meta(config).moe_layers() for p in moe.experts.parameters()
    )


@dataclass(frozen=True)
class FlopCount:
    """Forward matmul FLOPs per token (2 per multiply-add), by part."""

    attention: int
    """Attention projections (q, k, v, o and any low-rank factors), all layers."""
    attention_scores: float
    """q.k and weights.v over the mean causal context, all layers."""
    ffn: int
    """Expert / dense FFN matmuls a token runs: K routed + shared experts, or the dense MLP."""
    router: int
    """Router scoring (x @ W_router) and shared-expert gates."""
    lm_head: int
    """The output projection to the vocabulary."""

    @property
    def total(self) -> float:
        return self.attention + self.attention_scores + self.ffn + self.router + self.lm_head


def _mlp_flops(d_model: int, width: int, activation: str) -> int:
    mats = 3 if activation == "swiglu" else 2
    return 2 * mats * d_model * width


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> FlopCount:
    """Forward matmul FLOPs per token of a sequence of seq_len tokens (default max_seq_len).

    Norms, activations, softmax and RoPE are not counted. The FFN part is separable from
    the router, so an MoE model and its dense twin have equal `ffn`.
    """
    from moekit.model.attention import get_attention

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    seq_len = config.max_seq_len if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    if seq_len > config.max_seq_len:
        raise ValueError(
            f"seq_len must be <= the model's max_seq_len ({config.max_seq_len}), got {seq_len!r}"
        )
    D = config.d_model
    with torch.device("meta"):
        attn = get_attention(config.attention)(config, 0)
    attn_params = sum(m.weight.numel() for m in attn.modules() if isinstance(m, nn.Linear))
    # A causal token at position p attends p + 1 keys; (seq_len + 1) / 2 on average.
    context = (seq_len + 1) / 2
    scores = 2 * config.num_heads * (config.qk_head_dim + config.value_head_dim) * context
    ffn = router = 0
    for i in range(config.num_layers):
        if config.is_sparse_place(i):
            moe = config.moe
            ffn += _mlp_flops(D, moe.active_ffn_width, moe.activation)
            if config.is_moe_layer(i):
                router += 2 * D * moe.num_experts + (2 * D if moe.shared_expert_gate else 0)
        else:
            ffn += _mlp_flops(D, config.dense_width, config.activation)
    return FlopCount(
        attention=2 * attn_params * config.num_layers,
        attention_scores=scores * config.num_layers,
        ffn=ffn,
        router=router,
        lm_head=2 * D * config.vocab_size,
    )
