"""One transformer block: pre-norm attention and pre-norm feed-forward, each residual.

Shapes: B batch, S new positions, L key positions, D model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit.layer import MoE, MoEOutput
from moekit.mlp import MLP
from moekit.model.attention import get_attention
from moekit.model.cache import LayerCache
from moekit.model.config import ModelConfig
from moekit.model.norm import RMSNorm
from moekit.model.rope import RotaryEmbedding


def make_ffn(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward of layer layer_idx: MoE, or a dense MLP (the twin's width in MoE places)."""
    if config.is_moe_layer(layer_idx):
        return MoE(config.moe)
    if config.is_sparse_place(layer_idx):
        return MLP(config.d_model, config.moe.active_ffn_width, config.moe.activation)
    return MLP(config.d_model, config.dense_width, config.activation)


class Block(nn.Module):
    """x + attn(attn_norm(x)), then h + ffn(ffn_norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = get_attention(config.attention)(config, layer_idx)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = make_ffn(config, layer_idx)

    def forward(
        self,
        x_BSD: Tensor,
        rope: RotaryEmbedding,
        padding_mask: Tensor | None,
        cache_layer: LayerCache | None,
        start_pos: int,
        dropless: bool = False,
    ) -> tuple[Tensor, MoEOutput | None]:
        """padding_mask: None or bool [B, L] over all key positions (True = padding);
        dropless: route every assignment whatever the MoE's capacity (`MoE.forward`)."""
        h_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope, padding_mask, cache_layer, start_pos)
        z_BSD = self.ffn_norm(h_BSD)
        if not self.is_moe:
            return h_BSD + self.ffn(z_BSD), None
        new_padding = None if padding_mask is None else padding_mask[:, start_pos:]
        y_BSD, out = self.ffn(z_BSD, padding_mask=new_padding, dropless=dropless)
        return h_BSD + y_BSD, out
