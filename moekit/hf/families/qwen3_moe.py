"""Qwen3-MoE: softmax top-k (renormalised with norm_topk_prob), RMSNorm on each query and
key head before RoPE, explicit head_dim, no shared expert."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.families.base import (
    Family,
    common_fields,
    common_hf,
    dense_layer_ids,
    dense_width_if_used,
    hf_aux_coef,
    refuse_sliding_window,
    require,
    require_one_of,
    with_aux_coef,
    with_defaults,
)
from moekit.model.config import ModelConfig

NAME = "qwen3_moe"
DEFAULTS = {
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "intermediate_size": 6144,
    "use_sliding_window": False,
}
"""transformers' Qwen3MoeConfig defaults of the keys read here."""


def to_model_config(hf: dict) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    # use_sliding_window switches the window on for every layer (transformers' Qwen3-MoE
    # reads no layer_types).
    window = hf.get("sliding_window", 4096) if hf["use_sliding_window"] else None
    refuse_sliding_window(hf, NAME, window)
    fields = common_fields(hf, NAME, default_theta=10000.0)
    # Hub configs say num_experts; transformers 5 writes its alias num_local_experts.
    num_experts = require_one_of(hf, NAME, ("num_experts", "num_local_experts"))
    moe = MoEConfig(
        d_model=fields["d_model"],
        d_ff=int(require(hf, NAME, "moe_intermediate_size")),
        num_experts=int(num_experts),
        top_k=int(require(hf, NAME, "num_experts_per_tok")),
        router="softmax_topk",
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        z_loss_coef=0.0,
    )
    bias = bool(hf["attention_bias"])
    fields.update(
        moe=moe,
        qk_norm="head",
        qkv_bias=bias,
        o_bias=bias,
        moe_every=int(require(hf, NAME, "decoder_sparse_step")),
        dense_layers=dense_layer_ids(hf),
    )
    config = ModelConfig(
        **fields, dense_d_ff=dense_width_if_used(fields, hf.get("intermediate_size"))
    )
    return with_aux_coef(config, hf["router_aux_loss_coef"])


def to_hf_config(config: ModelConfig) -> dict:
    moe = config.moe
    return {
        **common_hf(config, NAME, "Qwen3MoeForCausalLM"),
        "head_dim": config.head_size,
        "intermediate_size": config.dense_width,
        "moe_intermediate_size": moe.d_ff,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "attention_bias": config.qkv_bias,
        "decoder_sparse_step": config.moe_every,
        "mlp_only_layers": list(config.dense_layers),
        "router_aux_loss_coef": hf_aux_coef(config),
        "use_sliding_window": False,
    }


QWEN3_MOE = Family(
    model_type=NAME,
    architecture="Qwen3MoeForCausalLM",
    to_model_config=to_model_config,
    to_hf_config=to_hf_config,
    defaults=DEFAULTS,
)
