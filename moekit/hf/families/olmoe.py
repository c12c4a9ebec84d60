"""OLMoE: softmax top-k without renormalisation by default, RMSNorm over the whole query and
key projections, optional clamping of q, k and v (clip_qkv)."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.families.base import (
    Family,
    UnsupportedConfig,
    common_fields,
    common_hf,
    hf_aux_coef,
    require,
    with_aux_coef,
    with_defaults,
)
from moekit.model.config import ModelConfig

NAME = "olmoe"
DEFAULTS = {
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "norm_topk_prob": False,
    "router_aux_loss_coef": 0.01,
    "attention_bias": False,
}
"""transformers' OlmoeConfig defaults of the keys read here (num_key_value_heads: as many
as num_attention_heads)."""


def to_model_config(hf: dict) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    fields = common_fields(hf, NAME, default_theta=10000.0)
    head_dim, heads, width = fields["head_dim"], fields["num_heads"], fields["d_model"]
    if head_dim is not None and head_dim * heads != width:
        # transformers sizes OLMoE's q/k norms from hidden_size, whatever head_dim says.
        raise UnsupportedConfig(
            f"olmoe: head_dim={head_dim} x {heads} heads != hidden_size ({width}); OLMoE "
            "normalises the whole query over hidden_size, so its heads must span it"
        )
    moe = MoEConfig(
        d_model=fields["d_model"],
        d_ff=int(require(hf, NAME, "intermediate_size")),
        num_experts=int(require(hf, NAME, "num_experts")),
        top_k=int(require(hf, NAME, "num_experts_per_tok")),
        router="softmax_topk",
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        z_loss_coef=0.0,
    )
    bias = bool(hf["attention_bias"])
    clip = hf.get("clip_qkv")
    config = ModelConfig(
        **fields,
        moe=moe,
        qk_norm="full",
        clip_qkv=None if clip is None else float(clip),
        qkv_bias=bias,
        o_bias=bias,
    )
    return with_aux_coef(config, hf["router_aux_loss_coef"])


def to_hf_config(config: ModelConfig) -> dict:
    moe = config.moe
    return {
        **common_hf(config, NAME, "OlmoeForCausalLM"),
        "intermediate_size": moe.d_ff,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "clip_qkv": config.clip_qkv,
        "attention_bias": config.qkv_bias,
        "router_aux_loss_coef": hf_aux_coef(config),
    }


OLMOE = Family(
    model_type=NAME,
    architecture="OlmoeForCausalLM",
    to_model_config=to_model_config,
    to_hf_config=to_hf_config,
    defaults=DEFAULTS,
)
