"""Causal self-attention: the attention interface, its registry, and grouped-query attention.

Shapes: B batch, S new positions, L key positions (start_pos + S), D model dim,
H query heads, G key/value heads, Dh head dim.

The interface every attention class implements (gqa here; mla in moekit.model.mla):

    cls(config: ModelConfig, layer_idx: int)
    forward(x_BSD, rope, padding_mask, cache_layer, start_pos) -> y_BSD

- x_BSD: the normed hidden states of the S new positions start_pos .. start_pos + S - 1.
- rope: the model's shared `RotaryEmbedding` (width config.rope_dim);
  `rope(t_BSHR, start_pos)` rotates t in the rotate-half layout.
- padding_mask: None, or bool [B, L] over *every* key position 0 .. L - 1 (True = padding);
  `causal_mask` turns it into what scaled_dot_product_attention takes.
- cache_layer: None (no cache), or this layer's `LayerCache`; `cache_layer.update(start_pos,
  name=t_BS..., ...)` stores whatever tensors the class chooses and returns them for all L.
- start_pos: positions already in the cache (0 without one).

Register a class with `ATTENTIONS[name] = cls`; names in `_LAZY` are imported on first use.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.model.cache import LayerCache
from moekit.model.config import ModelConfig
from moekit.model.norm import RMSNorm
from moekit.model.rope import RotaryEmbedding

ATTENTIONS: dict[str, type[nn.Module]] = {}
_LAZY = {"mla": "moekit.model.mla"}


def get_attention(name: str) -> type[nn.Module]:
    """The attention class registered under name (importing its module if needed)."""
    if name not in ATTENTIONS and name in _LAZY:
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as err:
            raise ValueError(f"attention {name!r} is not available: {err}") from err
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {name!r}")
    return ATTENTIONS[name]


def causal_mask(
    S: int, start_pos: int, padding_mask: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention.

    Query at position p sees keys j <= p that are not padding. A query always sees its own
    key, even when it is padding: a row with no key at all would make NaNs that reach
    real tokens through the next layer's 0 * NaN.
    """
    if padding_mask is None:
        if start_pos == 0:
            return None, S > 1
        if S == 1:
            return None, False
    L = start_pos + S
    q_pos = torch.arange(start_pos, L, device=device)[:, None]
    k_pos = torch.arange(L, device=device)[None, :]
    allowed_SL = k_pos <= q_pos
    if padding_mask is None:
        return allowed_SL, False
    own_SL = k_pos == q_pos
    allowed_BSL = allowed_SL & (~padding_mask[:, None, :] | own_SL)
    return allowed_BSL[:, None], False


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): G key/value heads shared by H/G
    query heads each; multi-head attention when G = H.

    Options for the Hugging Face families: q/k/v biases (Qwen2-MoE), qk_norm "head"
    (RMSNorm over each head's Dh, Qwen3-MoE) or "full" (over the whole projection, OLMoE),
    clip_qkv (OLMoE). Order as in those models: project, full norm, clip, split heads,
    head norm, RoPE.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D, H, G, Dh = config.d_model, config.num_heads, config.kv_heads, config.head_size
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, Dh
        self.qk_norm = config.qk_norm
        self.clip_qkv = config.clip_qkv
        self.q_proj = nn.Linear(D, H * Dh, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_bias)
        if config.qk_norm == "head":
            self.q_norm = RMSNorm(Dh, config.norm_eps)
            self.k_norm = RMSNorm(Dh, config.norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(H * Dh, config.norm_eps)
            self.k_norm = RMSNorm(G * Dh, config.norm_eps)

    def forward(
        self,
        x_BSD: Tensor,
        rope: RotaryEmbedding,
        padding_mask: Tensor | None,
        cache_layer: LayerCache | None,
        start_pos: int,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q_BSHD = q.view(B, S, self.num_heads, self.head_dim)
        k_BSGD = k.view(B, S, self.num_kv_heads, self.head_dim)
        v_BSGD = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHD, k_BSGD = self.q_norm(q_BSHD), self.k_norm(k_BSGD)
        q_BSHD, k_BSGD = rope(q_BSHD, start_pos), rope(k_BSGD, start_pos)
        if cache_layer is not None:
            k_BSGD, v_BSGD = cache_layer.update(start_pos, k=k_BSGD, v=v_BSGD)
        mask, is_causal = causal_mask(S, start_pos, padding_mask, x_BSD.device)
        y_BHSD = F.scaled_dot_product_attention(
            q_BSHD.transpose(1, 2),
            k_BSGD.transpose(1, 2),
            v_BSGD.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(y_BHSD.transpose(1, 2).reshape(B, S, self.o_proj.in_features))


ATTENTIONS["gqa"] = GroupedQueryAttention
