"""The Hugging Face model families moekit loads and exports, by config.json model_type."""

from __future__ import annotations

from moekit.hf.families.base import Family, UnsupportedConfig
from moekit.hf.families.deepseek_v3 import DEEPSEEK_V3
from moekit.hf.families.mixtral import MIXTRAL
from moekit.hf.families.olmoe import OLMOE
from moekit.hf.families.qwen2_moe import QWEN2_MOE
from moekit.hf.families.qwen3_moe import QWEN3_MOE

FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3)
}


def get_family(model_type: object) -> Family:
    """The family of a config.json model_type; an error lists the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedConfig(f"model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "UnsupportedConfig", "get_family"]
