"""Tensor names and layouts: moekit parameters <-> Hugging Face checkpoint tensors.

Shapes: E experts, D model dim, F expert hidden dim.

Everything but the routed experts is a rename (moekit keeps the nn.Linear [out, in]
layout and the Hugging Face module names inside attention, dense MLPs and shared experts).
The expert bank stacks experts in the same [out, in] layout, w_gate_EFD, w_up_EFD
[E, F, D] and w_down_EDF [E, D, F], so loading is slicing or stacking, never a transpose;
checkpoints hold them in one of two layouts, both read here:

- per expert (Hub checkpoints, and what transformers 5.23's save_pretrained writes):
  `experts.{j}.{gate}.weight` [F, D], `.{up}.weight` [F, D], `.{down}.weight` [D, F];
- fused (transformers 5 in memory, and saved with `save_original_format=False`, where
  Mixtral's block is named `mlp` too): `experts.gate_up_proj` [E, 2F, D] (gate rows first)
  and `experts.down_proj` [E, D, F].

Export writes the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from moekit.hf.families import Family
from moekit.hf.io import Ledger
from moekit.model.config import ModelConfig

_RENAMES = (
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"layers\.(\d+)\.attn_norm\.(.+)", r"model.layers.\1.input_layernorm.\2"),
    (r"layers\.(\d+)\.ffn_norm\.(.+)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"layers\.(\d+)\.attn\.(.+)", r"model.layers.\1.self_attn.\2"),
)
_BANK = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")


def hf_name(family: Family, config: ModelConfig, name: str) -> str:
    """The checkpoint tensor holding moekit parameter `name` (experts excepted)."""
    for pattern, repl in _RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, repl, name)
    m = re.fullmatch(r"layers\.(\d+)\.ffn\.(.+)", name)
    if m is None:
        raise KeyError(f"no Hugging Face name for moekit parameter {name!r}")
    i, rest = int(m[1]), m[2]
    layer = f"model.layers.{i}"
    if not config.is_moe_layer(i):
        return f"{layer}.mlp.{rest}"
    block = f"{layer}.{family.moe_key}"
    if rest == "router.weight":
        return f"{block}.gate.weight"
    if rest == "router.expert_bias":
        return f"{block}.gate.e_score_correction_bias"
    if rest.startswith("shared_experts.") and family.shared_key:
        return f"{block}.{family.shared_key}.{rest.removeprefix('shared_experts.')}"
    if rest == "shared_expert_gate.weight":
        return f"{block}.shared_expert_gate.weight"
    raise KeyError(f"no Hugging Face name for moekit parameter {name!r} in {family.model_type}")


def bank_prefix(family: Family, layer: int) -> str:
    return f"model.layers.{layer}.{family.moe_key}.experts"


def read_bank(
    ledger: Ledger, prefix: str, names: tuple[str, str, str], E: int, D: int, F: int
) -> dict[str, Tensor | None]:
    """The three stacked expert tensors of one MoE layer, from either layout (None if broken)."""
    if f"{prefix}.gate_up_proj" in ledger.files:
        gate_up = ledger.take(f"{prefix}.gate_up_proj", (E, 2 * F, D))
        down = ledger.take(f"{prefix}.down_proj", (E, D, F))
        return {
            "w_gate_EFD": None if gate_up is None else gate_up[:, :F],
            "w_up_EFD": None if gate_up is None else gate_up[:, F:],
            "w_down_EDF": down,
        }
    out: dict[str, Tensor | None] = {}
    for slot, hf, shape in zip(_BANK, names, ((F, D), (F, D), (D, F)), strict=True):
        parts = [ledger.take(f"{prefix}.{j}.{hf}.weight", shape) for j in range(E)]
        ok = all(p is not None for p in parts)
        out[slot] = torch.stack(parts) if ok else None
    return out


def write_bank(family: Family, layer: int, bank: dict[str, Tensor]) -> dict[str, Tensor]:
    """One MoE layer's experts in the per-expert checkpoint layout."""
    prefix = bank_prefix(family, layer)
    out = {}
    for slot, hf in zip(_BANK, family.expert_names, strict=True):
        for j, w in enumerate(bank[slot].unbind(0)):
            out[f"{prefix}.{j}.{hf}.weight"] = w.contiguous()
    return out
