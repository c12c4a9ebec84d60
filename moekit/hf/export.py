"""`save_pretrained`: a moekit `Transformer` as a Hugging Face checkpoint directory.

The family is given or inferred; either way the config must survive the round trip
ModelConfig -> Hugging Face config -> ModelConfig unchanged (training-only fields aside),
otherwise the export is refused with the fields that would change: a checkpoint that
transformers would run differently from moekit is never written. Experts are written in
the per-expert layout that every transformers version loads.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from moekit.hf.families import FAMILIES, Family, UnsupportedConfig, get_family
from moekit.hf.io import CONFIG_FILE, save_tensors
from moekit.hf.tensors import hf_name, write_bank
from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer

# Tried in this order when no family is named: the most specific configs come last, so a
# plain softmax-router model exports as Mixtral.
_INFER_ORDER = ("mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v3")
# Fields that only shape training (losses, noise, init, implementation choice): they never
# change a model's logits, so an export need not carry them.
TRAINING_ONLY_MOE = (
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "z_loss_coef",
    "bias_update_rate",
    "router_jitter",
    "router_noise",
    "impl",
    "drop_policy",
)
TRAINING_ONLY_MODEL = ("init_std",)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def roundtrip_mismatch(family: Family, config: ModelConfig) -> list[str]:
    """Fields of config that `family` cannot represent (empty when the export is exact)."""
    if config.moe is None:
        return ["moe: None (dense models are not an MoE family)"]
    try:
        back = family.to_model_config(family.to_hf_config(config))
    except (ValueError, TypeError) as err:
        return [str(err)]
    keep = {name: getattr(config.moe, name) for name in TRAINING_ONLY_MOE}
    back = back.replace(
        moe=back.moe.replace(**keep),
        **{name: getattr(config, name) for name in TRAINING_ONLY_MODEL},
    )
    # Defaults spelt out (head width d_model / heads, as many kv heads as heads) compare
    # equal to the defaults left implicit, which is how configs are read back.
    if config.head_dim is not None and config.head_dim * config.num_heads == config.d_model:
        config = config.replace(head_dim=None)
    if config.num_kv_heads == config.num_heads:
        config = config.replace(num_kv_heads=None)
    if config.moe.shared_d_ff == config.moe.d_ff:
        config = config.replace(moe=config.moe.replace(shared_d_ff=None))
    # The dense width compares resolved (None means the MoE's active width) and only where
    # some layer is dense: elsewhere the field is unused and not written.
    has_dense = len(config.moe_layer_ids) < config.num_layers
    config, back = (
        c.replace(dense_d_ff=c.dense_width if has_dense else None) for c in (config, back)
    )
    diffs = []
    for f in fields(ModelConfig):
        mine, theirs = getattr(config, f.name), getattr(back, f.name)
        if f.name == "moe":
            diffs += [
                f"moe.{g.name}: {getattr(mine, g.name)!r} would load as {getattr(theirs, g.name)!r}"
                for g in fields(mine)
                if getattr(mine, g.name) != getattr(theirs, g.name)
            ]
        elif mine != theirs:
            diffs.append(f"{f.name}: {mine!r} would load as {theirs!r}")
    return diffs


def infer_family(config: ModelConfig) -> Family:
    """The first family that represents config exactly; an error lists why each fails."""
    reasons = []
    for name in _INFER_ORDER:
        diffs = roundtrip_mismatch(FAMILIES[name], config)
        if not diffs:
            return FAMILIES[name]
        reasons.append(f"{name}: {diffs[0]}" + (f" (+{len(diffs) - 1} more)" if diffs[1:] else ""))
    raise UnsupportedConfig(
        "no Hugging Face family represents this config exactly:\n  " + "\n  ".join(reasons)
    )


def hf_state_dict(model: Transformer, family: Family) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's checkpoint names and layouts."""
    config = model.config
    state = model.state_dict()
    out = {}
    for name, t in state.items():
        if ".ffn.experts." in name or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        out[hf_name(family, config, name)] = t
    for i in config.moe_layer_ids:
        prefix = f"layers.{i}.ffn.experts."
        bank = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        out.update(write_bank(family, i, bank))
    return out


def save_pretrained(
    model: Transformer,
    directory: str | os.PathLike,
    family: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write model as a Hugging Face checkpoint that transformers loads with equal logits.

    Args:
        model: a moekit Transformer with MoE layers.
        directory: created if needed; gets config.json and model.safetensors (or shards
            of at most max_shard_bytes plus model.safetensors.index.json).
        family: a model_type (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3); None =
            the first that represents the config exactly.

    Raises:
        UnsupportedConfig: the config has settings the family cannot express (listed).
    """
    config = model.config
    fam = infer_family(config) if family is None else get_family(family)
    diffs = roundtrip_mismatch(fam, config)
    if diffs:
        raise UnsupportedConfig(
            f"{fam.model_type} cannot represent this config exactly:\n  " + "\n  ".join(diffs)
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = fam.to_hf_config(config)
    hf_config["dtype"] = _DTYPE_NAMES.get(model.embed.weight.dtype, "float32")
    save_tensors(directory, hf_state_dict(model, fam), max_shard_bytes)
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory
