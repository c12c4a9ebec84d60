"""What every family shares: the Family record, common config fields, refused options.

A family maps one Hugging Face `model_type` onto moekit in both directions
(`to_model_config`, `to_hf_config`) and names where its MoE tensors live (`moe_key`,
`expert_names`, `shared_key`); moekit.hf.tensors turns that into the tensor mapping.
Options that would change the forward pass and that moekit does not implement raise
`UnsupportedConfig` naming the option: a checkpoint is never loaded into a model that
computes something else. Fields that cannot change the logits (token ids, init ranges,
dropout, cache flags, tensor-parallel plans) are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from moekit.model.config import ModelConfig


class UnsupportedConfig(ValueError):
    """A Hugging Face config option that moekit cannot reproduce exactly."""


def unsupported(family: str, option: str, value: object, why: str = "") -> UnsupportedConfig:
    tail = f" ({why})" if why else ""
    return UnsupportedConfig(f"{family}: config option {option}={value!r} is not supported{tail}")


def require(hf: dict, family: str, key: str) -> object:
    """hf[key], which must be present and not null."""
    if key not in hf:
        raise UnsupportedConfig(f"{family}: config.json lacks the required field {key!r}")
    if hf[key] is None:
        raise UnsupportedConfig(f"{family}: config.json's required field {key!r} is null")
    return hf[key]


def require_one_of(hf: dict, family: str, keys: tuple[str, ...], default: object = None) -> object:
    """The value of the first of `keys` (aliases) that hf has, which must not be null;
    `default` when it has none of them, or an error naming them when default is None."""
    for key in keys:
        if key in hf:
            return require(hf, family, key)
    if default is None:
        names = " or ".join(repr(k) for k in keys)
        raise UnsupportedConfig(f"{family}: config.json lacks the required field {names}")
    return default


# Keys of a yarn rope_parameters dict -> ModelConfig fields (transformers' names and defaults).
_YARN_KEYS = {
    "factor": "rope_factor",
    "original_max_position_embeddings": "rope_original_max_seq_len",
    "beta_fast": "rope_beta_fast",
    "beta_slow": "rope_beta_slow",
    "mscale": "rope_mscale",
    "mscale_all_dim": "rope_mscale_all_dim",
    "attention_factor": "rope_attention_factor",
    "truncate": "rope_truncate",
}
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}


def rope_fields(hf: dict, family: str, default_theta: float) -> dict:
    """rope_theta and the rope_* fields. Plain RoPE and YaRN over the full rotary width are
    run; other scaled variants (linear, dynamic, llama3, longrope, ...) are refused."""
    # A non-empty legacy rope_scaling wins over rope_parameters, as in transformers'
    # convert_rope_params_to_dict: older configs carry both, the new one at its default.
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise unsupported(family, "rope_parameters", params, "per-layer RoPE settings")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise unsupported(
            family, "rope_parameters.rope_type", kind, "only default and yarn RoPE are run"
        )
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise unsupported(family, "partial_rotary_factor", factor)
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", default_theta)))}
    if kind == "yarn":
        out.update(_yarn_fields(hf, params))
    return out


def _yarn_fields(hf: dict, params: dict) -> dict:
    # transformers' standardize_rope_params: a top-level original_max_position_embeddings
    # wins, then the dict's, then max_position_embeddings; factor None means the ratio.
    max_len = hf.get("max_position_embeddings", 4096)
    original = hf.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", max_len
    )
    factor = params.get("factor")
    if factor is None:
        factor = max_len / original
    out = {"rope_type": "yarn", "rope_factor": float(factor)}
    out["rope_original_max_seq_len"] = int(original)
    for key in ("beta_fast", "beta_slow"):
        # `or`: transformers reads a null or 0 beta as its default.
        out[_YARN_KEYS[key]] = float(params.get(key) or _YARN_DEFAULTS[key])
    for key in ("mscale", "mscale_all_dim", "attention_factor"):
        value = params.get(key)
        out[_YARN_KEYS[key]] = None if value is None else float(value)
    out["rope_truncate"] = bool(params.get("truncate", True))
    return out


def rope_parameters(config: ModelConfig) -> dict:
    """The Hugging Face rope_parameters dict of a config (the inverse of rope_fields)."""
    out = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type == "yarn":
        for key, name in _YARN_KEYS.items():
            value = getattr(config, name)
            if value is not None:
                out[key] = value
    return out


INTEGER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
    "first_k_dense_replace",
    "moe_layer_freq",
    "n_routed_experts",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_nextn_predict_layers",
)
"""Count and size fields of every family's config.json: integers (or null where a family
allows it), never floats or strings, which int() would truncate or parse."""


def check_integer_fields(hf: dict, family: str) -> None:
    for key in INTEGER_FIELDS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise unsupported(family, key, value, "an integer is needed")


def common_fields(hf: dict, family: str, default_theta: float) -> dict:
    """ModelConfig fields every family reads the same way; hf has the family's defaults."""
    check_integer_fields(hf, family)
    # transformers' ACT2FN maps "swish" to the same SiLU.
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise unsupported(family, "hidden_act", hf["hidden_act"], "experts are SwiGLU with silu")
    if hf.get("quantization_config"):
        quant = hf["quantization_config"]
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise unsupported(family, "quantization_config", method, "dequantize the checkpoint first")
    num_heads = int(require(hf, family, "num_attention_heads"))
    kv_heads = hf.get("num_key_value_heads")
    head_dim = hf.get("head_dim")
    d_model = int(require(hf, family, "hidden_size"))
    if head_dim is not None and d_model % num_heads == 0 and head_dim == d_model // num_heads:
        head_dim = None  # the default width, written out: one canonical ModelConfig
    return dict(
        vocab_size=int(require(hf, family, "vocab_size")),
        d_model=int(require(hf, family, "hidden_size")),
        num_layers=int(require(hf, family, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=None if kv_heads in (None, num_heads) else int(kv_heads),
        head_dim=None if head_dim is None else int(head_dim),
        max_seq_len=int(require(hf, family, "max_position_embeddings")),
        norm_eps=float(require(hf, family, "rms_norm_eps")),
        **rope_fields(hf, family, default_theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        activation="swiglu",
    )


def common_hf(config: ModelConfig, model_type: str, architecture: str) -> dict:
    """The Hugging Face config fields every family writes the same way."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": rope_parameters(config),
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "dtype": "float32",
        "use_cache": True,
        # moekit configs hold no token ids; the family defaults may lie outside the vocab.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def refuse_sliding_window(hf: dict, family: str, window: object, key: str | None = None) -> None:
    """Sliding-window attention is not run: refuse a window that some layer uses.

    window: the width the family's layers attend over, None where no layer slides (each
    family reads its config its own way). A window of at least max_position_embeddings
    hides no key and is no window; a window of 0 is one (transformers then lets no query
    see any key). key: the config key to name (default sliding_window).
    """
    if window is not None and window < hf.get("max_position_embeddings", float("inf")):
        shown = window if key is None else "sliding_attention"
        raise unsupported(family, key or "sliding_window", shown, "no sliding windows")


def dense_width_if_used(config_fields: dict, intermediate_size: int | None) -> int | None:
    """dense_d_ff for a config: the checkpoint's dense width when some layer is dense."""
    probe = ModelConfig(**{**config_fields, "dense_d_ff": intermediate_size or 1})
    if all(probe.is_moe_layer(i) for i in range(probe.num_layers)):
        return None
    return intermediate_size


def with_aux_coef(config: ModelConfig, router_aux_loss_coef: object) -> ModelConfig:
    """config with the aux_loss_coef that weighs balancing as transformers weighs it.

    transformers' load_balancing_loss_func pools the counts and probabilities of every
    MoE layer, scores K for a uniform router, and multiplies that one loss by
    router_aux_loss_coef. moekit scores each layer alone (1.0 when uniform: pooled
    statistics let one layer's imbalance cancel another's) and sums the L layers. With
    coef * K / L both give, at balance, the same loss and the same gradient per router
    probability; a plain copy of the number would weigh balancing L / K times as much
    (16x for Mixtral-8x7B). Training-only: the logits never depend on it.
    """
    if isinstance(router_aux_loss_coef, bool) or not isinstance(router_aux_loss_coef, int | float):
        raise UnsupportedConfig(
            f"router_aux_loss_coef must be a number, got {router_aux_loss_coef!r}"
        )
    coef = float(router_aux_loss_coef)
    layers = len(config.moe_layer_ids)
    if not layers:
        return config
    return config.replace(moe=config.moe.replace(aux_loss_coef=coef * config.moe.top_k / layers))


def hf_aux_coef(config: ModelConfig) -> float:
    """router_aux_loss_coef for config's aux_loss_coef: the inverse of `with_aux_coef`."""
    layers = len(config.moe_layer_ids)
    return config.moe.aux_loss_coef * layers / config.moe.top_k if layers else 0.0


def dense_layer_ids(hf: dict) -> tuple[int, ...]:
    """Qwen's mlp_only_layers as moekit's dense_layers: transformers tests membership
    only, so indices of no layer (after the layer count was cut, say) change nothing."""
    layers = int(hf["num_hidden_layers"])
    return tuple(sorted({int(i) for i in hf.get("mlp_only_layers") or [] if 0 <= int(i) < layers}))


def with_defaults(hf: dict, defaults: dict) -> dict:
    """config.json with each key it leaves out at the family's default.

    A key left out means transformers' config-class default, which differs by family
    (rms_norm_eps 1e-5 in Mixtral and OLMoE, 1e-6 in Qwen; DeepSeek-V3's
    routed_scaling_factor 2.5, 8 groups of which 4 are kept): read with any other default,
    the checkpoint would load into a model that computes something else. A key present
    with null keeps its null. tests/test_hf_defaults.py checks every family's defaults
    against the installed transformers.
    """
    return {**defaults, **hf}


@dataclass(frozen=True)
class Family:
    """One Hugging Face model type and how it maps onto moekit."""

    model_type: str
    """config.json's model_type."""
    architecture: str
    """config.json's architectures[0], written on export."""
    to_model_config: Callable[[dict], ModelConfig]
    """Hugging Face config dict -> ModelConfig (raises UnsupportedConfig)."""
    to_hf_config: Callable[[ModelConfig], dict]
    """ModelConfig -> Hugging Face config dict."""
    moe_key: str = "mlp"
    """Module name of the MoE block inside a decoder layer ('block_sparse_moe' in Mixtral)."""
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Per-expert tensor names of gate, up and down (w1, w3, w2 in Mixtral)."""
    shared_key: str | None = None
    """Module name of the shared expert(s) inside the MoE block, if any."""
    defaults: Mapping[str, object] = field(default_factory=dict)
    """transformers' defaults for the config keys the family reads (see with_defaults)."""
    extra_layers: Callable[[dict], int] = lambda hf: 0
    """Decoder layers stored after the last one that next-token logits never use (MTP)."""
