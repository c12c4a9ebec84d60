"""Qwen2-MoE: softmax top-k (renormalised only with norm_topk_prob), q/k/v biases, and a
shared expert whose output is scaled by sigmoid(x @ shared_expert_gate)."""

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
    with_aux_coef,
    with_defaults,
)
from moekit.model.config import ModelConfig

NAME = "qwen2_moe"
DEFAULTS = {
    "num_key_value_heads": 16,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.001,
    # Qwen2-MoE checkpoints predate the qkv_bias field; their q/k/v always had biases.
    "qkv_bias": True,
    "decoder_sparse_step": 1,
    "intermediate_size": 5632,
    "use_sliding_window": False,
}
"""transformers' Qwen2MoeConfig defaults of the keys read here."""


def _refuse_sliding_window(hf: dict) -> None:
    """Refuse a window that some layer uses, read as transformers' Qwen2-MoE reads it.

    layer_types, when given, says which layers slide, over sliding_window when
    use_sliding_window is on and 0 (no key seen) when off. Without it the layers come
    from max_window_layers, which transformers versions read in opposite ways (from it
    upwards in 4.x, below it in 5.x): the window is then taken to apply whenever it is
    switched on.
    """
    use = bool(hf["use_sliding_window"])
    window = hf.get("sliding_window", 4096) if use else 0
    types = hf.get("layer_types")
    if types is None:
        refuse_sliding_window(hf, NAME, window if use else None)
    elif "sliding_attention" in types:
        refuse_sliding_window(hf, NAME, window, key="layer_types")


def to_model_config(hf: dict) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    _refuse_sliding_window(hf)
    fields = common_fields(hf, NAME, default_theta=10000.0)
    moe_ff = int(require(hf, NAME, "moe_intermediate_size"))
    shared_ff = int(require(hf, NAME, "shared_expert_intermediate_size"))
    moe = MoEConfig(
        d_model=fields["d_model"],
        d_ff=moe_ff,
        num_experts=int(require(hf, NAME, "num_experts")),
        top_k=int(require(hf, NAME, "num_experts_per_tok")),
        router="softmax_topk",
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        num_shared_experts=1,
        shared_d_ff=None if shared_ff == moe_ff else shared_ff,
        shared_expert_gate=True,
        z_loss_coef=0.0,
    )
    fields.update(
        moe=moe,
        qkv_bias=bool(hf["qkv_bias"]),
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
        **common_hf(config, NAME, "Qwen2MoeForCausalLM"),
        "intermediate_size": config.dense_width,
        "moe_intermediate_size": moe.d_ff,
        "shared_expert_intermediate_size": moe.shared_d_ff or moe.d_ff,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "qkv_bias": config.qkv_bias,
        "decoder_sparse_step": config.moe_every,
        "mlp_only_layers": list(config.dense_layers),
        "router_aux_loss_coef": hf_aux_coef(config),
        "use_sliding_window": False,
    }


QWEN2_MOE = Family(
    model_type=NAME,
    architecture="Qwen2MoeForCausalLM",
    to_model_config=to_model_config,
    to_hf_config=to_hf_config,
    shared_key="shared_expert",
    defaults=DEFAULTS,
)
