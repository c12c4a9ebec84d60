"""Mixtral: softmax over all experts, top-k, weights renormalised over the k (Jiang et al. 2024)."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.families.base import (
    Family,
    common_fields,
    common_hf,
    hf_aux_coef,
    refuse_sliding_window,
    require,
    require_one_of,
    unsupported,
    with_aux_coef,
    with_defaults,
)
from moekit.model.config import ModelConfig

NAME = "mixtral"
DEFAULTS = {
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "rms_norm_eps": 1e-5,
    "num_experts_per_tok": 2,
    "router_aux_loss_coef": 0.001,
}
"""transformers' MixtralConfig defaults of the keys read here."""


def to_model_config(hf: dict) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    # Every layer attends over sliding_window when it is set: transformers' Mixtral reads
    # neither a use_sliding_window switch nor layer_types.
    refuse_sliding_window(hf, NAME, hf.get("sliding_window"))
    if hf.get("router_jitter_noise"):
        # Mixtral jitters the experts' input as well as the router's; moekit only the router's.
        raise unsupported(NAME, "router_jitter_noise", hf["router_jitter_noise"])
    fields = common_fields(hf, NAME, default_theta=1e6)
    moe = MoEConfig(
        d_model=fields["d_model"],
        d_ff=int(require(hf, NAME, "intermediate_size")),
        num_experts=int(require_one_of(hf, NAME, ("num_local_experts", "num_experts"), 8)),
        top_k=int(require(hf, NAME, "num_experts_per_tok")),
        router="softmax_topk",
        norm_topk_prob=True,
        z_loss_coef=0.0,
    )
    config = ModelConfig(**fields, moe=moe)
    return with_aux_coef(config, hf["router_aux_loss_coef"])


def to_hf_config(config: ModelConfig) -> dict:
    moe = config.moe
    return {
        **common_hf(config, NAME, "MixtralForCausalLM"),
        "intermediate_size": moe.d_ff,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": hf_aux_coef(config),
        "router_jitter_noise": 0.0,
        "sliding_window": None,
    }


MIXTRAL = Family(
    model_type=NAME,
    architecture="MixtralForCausalLM",
    to_model_config=to_model_config,
    to_hf_config=to_hf_config,
    moe_key="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
    defaults=DEFAULTS,
)
