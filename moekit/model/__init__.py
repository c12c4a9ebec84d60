"""The MoE transformer language model: config, presets, model, counts."""

from moekit.model.attention import ATTENTIONS, GroupedQueryAttention, get_attention
from moekit.model.cache import KVCache, LayerCache
from moekit.model.config import ModelConfig, dense_twin
from moekit.model.counting import FlopCount, count_parameters, flops_per_token
from moekit.model.norm import RMSNorm
from moekit.model.presets import LARGE_PRESETS, PRESETS, get_preset
from moekit.model.rope import RotaryEmbedding
from moekit.model.transformer import ModelOutput, Transformer

__all__ = [
    "ATTENTIONS",
    "LARGE_PRESETS",
    "PRESETS",
    "FlopCount",
    "GroupedQueryAttention",
    "KVCache",
    "LayerCache",
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "count_parameters",
    "dense_twin",
    "flops_per_token",
    "get_attention",
    "get_preset",
]
