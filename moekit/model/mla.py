"""Multi-head latent attention (DeepSeek-V2 §2.1, DeepSeek-V3): keys and values from a small
shared latent, so the KV cache holds kv_lora_rank + qk_rope_head_dim numbers per token
instead of 2 * H * Dh.

Shapes: B batch, S new positions, L key positions (start_pos + S), D model dim, H heads,
N qk_nope_head_dim, R qk_rope_head_dim, Dv v_head_dim, Cq q_lora_rank, Ckv kv_lora_rank.

    q      = W_qb(norm(W_qa x))            [B, S, H, N + R]   (or W_q x without q_lora_rank)
    c, k_r = split(W_kva x)                [B, S, Ckv], [B, S, R]: the latent and one shared
                                           rotary key for all heads (what the cache stores)
    k_n, v = split(W_kvb norm(c))          [B, L, H, N], [B, L, H, Dv]
    score  = (q_n . k_n + rope(q_r) . rope(k_r)) / sqrt(N + R)   (times mscale^2 with YaRN)

Parameter names are those of the Hugging Face DeepSeek-V3 checkpoints, so loading needs no
renaming. Keys and values are expanded from the cached latent at every step (the
"naive" form); folding W_kvb into the query and output ("absorbed" form) saves work when
decoding one token against a long cache but changes the float summation order, so it is
left out of this reference implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.model.attention import ATTENTIONS, causal_mask
from moekit.model.cache import LayerCache
from moekit.model.config import ModelConfig
from moekit.model.norm import RMSNorm
from moekit.model.rope import RotaryEmbedding

# DeepSeek's latent norms use their own eps (RMSNorm's default there), not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def deinterleave(t: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...) over the last dimension.

    DeepSeek-V3 stores rotary pairs as adjacent dimensions; after this permutation the
    rotate-half RoPE computes exactly the interleaved rotation, element for element.
    """
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


class MultiHeadLatentAttention(nn.Module):
    """MLA with the attention interface of moekit.model.attention; caches the latent.

    config.qkv_bias puts biases on the down-projections q_a_proj and kv_a_proj_with_mqa,
    config.o_bias on o_proj (DeepSeek's attention_bias sets both).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        D, H = config.d_model, config.num_heads
        self.layer_idx = layer_idx
        self.num_heads = H
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.rope_interleave = config.rope_interleave
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = qk_dim**-0.5
        if config.yarn is not None:
            # DeepSeek-V3 multiplies the softmax scale by mscale(factor, mscale_all_dim)^2,
            # YaRN's temperature (Peng et al. 2023, §3.4) applied to the whole score rather
            # than to the rotary part through cos/sin; same float order as transformers.
            m = config.yarn.softmax_scale_factor
            self.scale = self.scale * m * m
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.qkv_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope_dim, bias=config.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=config.o_bias)

    def forward(
        self,
        x_BSD: Tensor,
        rope: RotaryEmbedding,
        padding_mask: Tensor | None,
        cache_layer: LayerCache | None,
        start_pos: int,
    ) -> Tensor:
        B, S, _ = x_BSD.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope_BSHN, q_rot_BSHR = q.view(B, S, H, N + R).split((N, R), dim=-1)
        c_BSC, k_rot_BSR = self.kv_a_proj_with_mqa(x_BSD).split((self.kv_rank, R), dim=-1)
        c_BSC = self.kv_a_layernorm(c_BSC)
        k_rot_BS1R = k_rot_BSR[:, :, None, :]
        if self.rope_interleave:
            q_rot_BSHR, k_rot_BS1R = deinterleave(q_rot_BSHR), deinterleave(k_rot_BS1R)
        q_rot_BSHR = rope(q_rot_BSHR, start_pos)
        k_rot_BS1R = rope(k_rot_BS1R, start_pos)
        if cache_layer is not None:
            c_BSC, k_rot_BS1R = cache_layer.update(start_pos, latent=c_BSC, k_rot=k_rot_BS1R)
        L = c_BSC.shape[1]
        kv_BLH = self.kv_b_proj(c_BSC).view(B, L, H, N + self.v_dim)
        k_nope_BLHN, v_BLHV = kv_BLH.split((N, self.v_dim), dim=-1)
        k_BLHK = torch.cat((k_nope_BLHN, k_rot_BS1R.expand(B, L, H, R)), dim=-1)
        q_BSHK = torch.cat((q_nope_BSHN, q_rot_BSHR), dim=-1)
        mask, is_causal = causal_mask(S, start_pos, padding_mask, x_BSD.device)
        y_BHSV = F.scaled_dot_product_attention(
            q_BSHK.transpose(1, 2),
            k_BLHK.transpose(1, 2),
            v_BLHV.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
        )
        return self.o_proj(y_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))


ATTENTIONS["mla"] = MultiHeadLatentAttention
