"""DeepSeek-V3: multi-head latent attention, first layers dense, and a sigmoid router whose
correction bias steers only the choice of experts (auxiliary-loss-free balancing), with
group-limited top-k, renormalised weights times routed_scaling_factor, and shared experts.

Group masking: moekit gives experts outside the chosen groups a score of -inf, as
transformers 5 does; DeepSeek's reference code and transformers 4 use 0.0. The two agree
whenever every biased score (sigmoid + correction bias) in the chosen groups is positive,
which holds for the released checkpoints; a checkpoint whose biased scores can be negative
may route differently from those older implementations, never from transformers 5.
"""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.families.base import (
    Family,
    common_fields,
    common_hf,
    require,
    unsupported,
    with_defaults,
)
from moekit.model.config import ModelConfig

NAME = "deepseek_v3"
DEFAULTS = {
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "norm_topk_prob": True,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "n_shared_experts": 1,
    "first_k_dense_replace": 3,
    "q_lora_rank": 1536,
    "rope_interleave": True,
    "attention_bias": False,
}
"""transformers' DeepseekV3Config defaults of the keys read here (num_key_value_heads: MLA
has one key per query head whatever it says)."""


def _check(hf: dict) -> None:
    for option, wanted in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(option, wanted) != wanted:
            raise unsupported(NAME, option, hf[option], f"only {wanted!r} is run")
    if hf.get("moe_layer_freq", 1) != 1:
        raise unsupported(NAME, "moe_layer_freq", hf["moe_layer_freq"])
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if kv_heads not in (None, heads):
        # MLA expands the latent into one key per query head; fewer kv heads has no meaning.
        raise unsupported(NAME, "num_key_value_heads", kv_heads, "MLA needs num_attention_heads")


def _groups(hf: dict) -> dict:
    """num_groups and topk_groups: a null n_group or topk_group is one group, as
    transformers runs a config without group-limited routing."""
    groups, keep = int(hf["n_group"] or 1), int(hf["topk_group"] or 1)
    if hf["n_group"] is None and keep > 1:
        raise unsupported(NAME, "n_group", None, f"topk_group={keep} needs that many groups")
    return {"num_groups": groups, "topk_groups": keep}


def to_model_config(hf: dict) -> ModelConfig:
    hf = with_defaults(hf, DEFAULTS)
    _check(hf)
    fields = common_fields(hf, NAME, default_theta=10000.0)
    fields.update(num_kv_heads=None, head_dim=None)
    E = int(require(hf, NAME, "n_routed_experts"))
    moe_ff = int(require(hf, NAME, "moe_intermediate_size"))
    moe = MoEConfig(
        d_model=fields["d_model"],
        d_ff=moe_ff,
        num_experts=E,
        top_k=int(require(hf, NAME, "num_experts_per_tok")),
        router="sigmoid_bias",
        norm_topk_prob=bool(hf["norm_topk_prob"]),
        **_groups(hf),
        routed_scaling_factor=float(require(hf, NAME, "routed_scaling_factor")),
        num_shared_experts=int(hf["n_shared_experts"] or 0),
        shared_d_ff=None,  # each shared expert is moe_intermediate_size wide, as routed ones
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
    )
    # transformers makes every layer dense when first_k_dense_replace >= the layer count
    # (its default of 3 does that to a model of two layers).
    first_dense = min(int(hf["first_k_dense_replace"] or 0), fields["num_layers"])
    bias = bool(hf["attention_bias"])
    q_rank = hf["q_lora_rank"]
    return ModelConfig(
        **fields,
        moe=moe,
        first_k_dense=first_dense,
        dense_d_ff=int(require(hf, NAME, "intermediate_size")) if first_dense else None,
        attention="mla",
        q_lora_rank=None if q_rank is None else int(q_rank),
        kv_lora_rank=int(require(hf, NAME, "kv_lora_rank")),
        qk_nope_head_dim=int(require(hf, NAME, "qk_nope_head_dim")),
        qk_rope_head_dim=int(require(hf, NAME, "qk_rope_head_dim")),
        v_head_dim=int(require(hf, NAME, "v_head_dim")),
        rope_interleave=bool(hf["rope_interleave"]),
        qkv_bias=bias,
        o_bias=bias,
    )


def to_hf_config(config: ModelConfig) -> dict:
    moe = config.moe
    out = common_hf(config, NAME, "DeepseekV3ForCausalLM")
    del out["head_dim"]
    out.update(
        {
            "intermediate_size": config.dense_width,
            "moe_intermediate_size": moe.d_ff,
            "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "n_group": moe.num_groups,
            "topk_group": moe.topk_groups,
            "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "n_shared_experts": moe.num_shared_experts,
            "first_k_dense_replace": config.first_k_dense,
            "q_lora_rank": config.q_lora_rank,
            "kv_lora_rank": config.kv_lora_rank,
            "qk_nope_head_dim": config.qk_nope_head_dim,
            "qk_rope_head_dim": config.qk_rope_head_dim,
            "v_head_dim": config.v_head_dim,
            "rope_interleave": config.rope_interleave,
            "attention_bias": config.qkv_bias,
            "num_nextn_predict_layers": 0,
        }
    )
    return out


def _mtp_layers(hf: dict) -> int:
    # Multi-token-prediction modules are stored as extra decoder layers; next-token logits
    # never use them (transformers skips them on load too).
    return int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)


DEEPSEEK_V3 = Family(
    model_type=NAME,
    architecture="DeepseekV3ForCausalLM",
    to_model_config=to_model_config,
    to_hf_config=to_hf_config,
    shared_key="shared_experts",
    extra_layers=_mtp_layers,
    defaults=DEFAULTS,
)
