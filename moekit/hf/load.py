"""`from_pretrained`: a local Hugging Face MoE checkpoint as a moekit `Transformer`.

The model is first built on the `meta` device, so its state dict gives every tensor's
name and the shape the config implies without allocating anything; each checkpoint tensor
is then read, checked and assigned in place, and the whole checkpoint is accounted for
(unused, missing and misshapen tensors are one error). Loaded models are ordinary moekit
models: the same MoE layer, routers and expert paths as trained ones.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace

import torch
from torch import Tensor

from moekit.hf.families import Family, get_family
from moekit.hf.io import Ledger, TensorFiles, read_config
from moekit.hf.tensors import bank_prefix, hf_name, read_bank
from moekit.model.config import ModelConfig
from moekit.model.transformer import Transformer

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
"""Every family's names of the token embedding and the output head."""


def read_model_config(directory: str | os.PathLike) -> tuple[Family, ModelConfig, dict]:
    """(family, ModelConfig, raw config dict) of a Hugging Face checkpoint directory.

    A config that ties the head to the embeddings, in a directory whose weights also hold
    an lm_head.weight of other values, is read untied: transformers then keeps the two
    apart (with a warning), and the stored head is what its logits use.
    """
    hf = read_config(directory)
    family = get_family(hf.get("model_type"))
    config = family.to_model_config(hf)
    if config.tie_embeddings and _holds_its_own_head(directory):
        config = config.replace(tie_embeddings=False)
    return family, config, hf


def _holds_its_own_head(directory: str | os.PathLike) -> bool:
    try:
        files = TensorFiles(directory)
    except FileNotFoundError:  # no weights: the config alone ties them
        return False
    return _EMBED in files and _HEAD in files and not files.same_values(_EMBED, _HEAD)


_INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _ignored(files: TensorFiles, config: ModelConfig, extra_layers: int) -> frozenset[str]:
    """Tensors a checkpoint may hold that next-token logits never read."""
    skip = set()
    if extra_layers:
        last = config.num_layers + extra_layers
        for key in files.names():
            m = re.match(r"model\.layers\.(\d+)\.", key)
            if m and config.num_layers <= int(m[1]) < last:
                skip.add(key)
    # Tensors without elements: DeepSeek-V3 with n_shared_experts=0 stores a shared MLP of
    # width 0, which adds exactly 0 to every token.
    skip.update(key for key in files.names() if 0 in files.shape(key))
    # RoPE frequencies older exporters saved per layer: recomputed from the config, here
    # and in transformers, which ignores them too.
    skip.update(key for key in files.names() if _INV_FREQ.fullmatch(key))
    if config.tie_embeddings and _HEAD in files and _EMBED in files:
        # A tied copy some exporters write anyway; one of other values unties the config
        # (read_model_config), so it is not skipped. Stored alone, it is the embedding.
        skip.add(_HEAD)
    return frozenset(skip)


def _as_named_in(files: TensorFiles, family: Family, config: ModelConfig) -> Family:
    """The family as this checkpoint names its MoE blocks. transformers 5 saved without
    its conversion (`save_original_format=False`) names every family's block `mlp`, where
    Mixtral's Hub checkpoints say `block_sparse_moe`."""
    if family.moe_key == "mlp" or not config.moe_layer_ids:
        return family
    layer = f"model.layers.{config.moe_layer_ids[0]}"
    if f"{layer}.mlp.gate.weight" in files and f"{layer}.{family.moe_key}.gate.weight" not in files:
        return replace(family, moe_key="mlp")
    return family


def load_state(
    directory: str | os.PathLike,
    family: Family,
    config: ModelConfig,
    hf: dict,
    files: TensorFiles | None = None,
) -> dict[str, Tensor]:
    """The moekit state dict of a checkpoint, every tensor accounted for and shape-checked.

    files: the directory's tensor index when the caller has read it already."""
    files = TensorFiles(directory) if files is None else files
    family = _as_named_in(files, family, config)
    ledger = Ledger(files, _ignored(files, config, family.extra_layers(hf)))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    state: dict[str, Tensor | None] = {}
    for name, shape in shapes.items():
        if ".ffn.experts." in name or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        key = hf_name(family, config, name)
        if key == _EMBED and config.tie_embeddings and _EMBED not in files and _HEAD in files:
            # Tied, and only the head stored: transformers ties the embedding to it.
            key = _HEAD
        state[name] = ledger.take(key, shape)
    moe = config.moe
    for i in config.moe_layer_ids:
        bank = read_bank(
            ledger,
            bank_prefix(family, i),
            family.expert_names,
            moe.num_experts,
            config.d_model,
            moe.d_ff,
        )
        state.update({f"layers.{i}.ffn.experts.{slot}": t for slot, t in bank.items()})
    ledger.finish()
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


_STORED_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def _resolve_dtype(dtype: torch.dtype | str | None, hf: dict, files: TensorFiles) -> torch.dtype:
    """dtype as given; else as transformers' dtype="auto" picks it: the config's dtype,
    else the stored weights' (a null in config.json names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    name, source = dtype, ""
    if name is None:
        name, source = hf.get("dtype") or hf.get("torch_dtype"), " (config.json's dtype)"
    if name is None:
        stored = files.first_float_dtype()
        name = _STORED_DTYPES.get(stored, "float32")
        source = " (the stored weights' dtype)"
    if name not in _DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(_DTYPES)}, got {name!r}{source}"
            + ("; pass dtype to load it in another" if source else "")
        )
    return _DTYPES[name]


def from_pretrained(
    directory: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A moekit `Transformer` from a local Hugging Face checkpoint, in eval mode.

    Args:
        directory: holds config.json and model.safetensors or model.safetensors.index.json
            (safetensors only; nothing is unpickled). Families: mixtral, qwen2_moe,
            qwen3_moe, olmoe, deepseek_v3.
        dtype: parameter dtype; None = the config's dtype, else that of the stored
            weights, as transformers' dtype="auto".
            The sigmoid router's correction bias stays float32.
        device: where the model lives.

    Returns:
        The model; in float32 `model(ids_BS).logits` equals transformers' logits for the
        checkpoint to float rounding (tested to 1e-5). In bf16 the two round the expert
        combine at different points, so logits differ by bf16 noise (about what either
        differs from its own float32 run).

    Raises:
        UnsupportedConfig: a config option moekit cannot reproduce (named in the message).
        CheckpointError: missing, unknown, misshapen or truncated tensors (all listed).
    """
    family, config, hf = read_model_config(directory)
    files = TensorFiles(directory)  # every shard's header, read once for both
    target = _resolve_dtype(dtype, hf, files)
    state = load_state(directory, family, config, hf, files)
    for name, t in state.items():
        # Float32 always for the selection bias: its updates are below bf16 resolution.
        want = torch.float32 if name.endswith("expert_bias") else target
        state[name] = t.to(device=device, dtype=want).contiguous()
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_meta:  # non-persistent: the RoPE tables
                module._buffers[key] = torch.empty_like(buf, device=device)
    model.rope.reset_parameters()
    return model.eval()
