"""RMSNorm, RoPE and grouped-query attention against plain float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from moekit.model import GroupedQueryAttention, ModelConfig, RMSNorm, RotaryEmbedding
from moekit.model.attention import causal_mask

D, H, G, DH, V = 24, 4, 2, 6, 37


def _cfg(**changes) -> ModelConfig:
    return ModelConfig(
        vocab_size=V,
        d_model=D,
        num_layers=2,
        num_heads=H,
        num_kv_heads=G,
        head_dim=DH,
        max_seq_len=16,
        dense_d_ff=40,
        **changes,
    )


def test_rmsnorm_matches_formula_and_hf_cast_order() -> None:
    norm = RMSNorm(7, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert_close(norm(x), expected)
    # bf16: statistic in float32, cast to bf16, then weight multiply (Hugging Face order).
    norm16 = RMSNorm(7).to(torch.bfloat16)
    with torch.no_grad():
        norm16.weight.copy_(norm.weight)
    xb = x.to(torch.bfloat16)
    xf = xb.float()
    ref = norm16.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm16(xb), ref)


def test_rope_is_a_rotation_of_half_pairs() -> None:
    R, theta, start = 6, 500.0, 3
    rope = RotaryEmbedding(R, theta, max_seq_len=12)
    x = torch.randn(2, 5, 3, R, dtype=torch.float64)
    y = rope(x, start)
    # Reference: dims j and j + R/2 form the complex number x_j + i x_{j+R/2}, rotated by
    # angle pos * theta^(-2j/R).
    pos = torch.arange(start, start + 5, dtype=torch.float64)[None, :, None, None]
    freq = theta ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)
    z = torch.complex(x[..., : R // 2], x[..., R // 2 :]) * torch.polar(
        torch.ones_like(freq), pos * freq
    )
    assert_close(y, torch.cat([z.real, z.imag], dim=-1), atol=1e-6, rtol=1e-6)


def _naive_attention(attn: GroupedQueryAttention, cfg: ModelConfig, x, allowed_BSL):
    B, S, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)

    def norm(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    if cfg.qk_norm == "full":
        q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    if cfg.clip_qkv is not None:
        c = cfg.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q, k, v = q.view(B, S, H, DH), k.view(B, S, G, DH), v.view(B, S, G, DH)
    if cfg.qk_norm == "head":
        q, k = norm(q, attn.q_norm.weight), norm(k, attn.k_norm.weight)
    rope = RotaryEmbedding(DH, cfg.rope_theta, cfg.max_seq_len).double()
    q, k = rope(q), rope(k)
    out = torch.empty(B, S, H, DH, dtype=x.dtype)
    for h in range(H):
        g = h // (H // G)  # query head h reads key/value head h // (H / G)
        scores = torch.einsum("bsd,bld->bsl", q[:, :, h], k[:, :, g]) / math.sqrt(DH)
        scores = scores.masked_fill(~allowed_BSL, float("-inf"))
        out[:, :, h] = torch.einsum("bsl,bld->bsd", scores.softmax(-1), v[:, :, g])
    return attn.o_proj(out.reshape(B, S, H * DH))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"qk_norm": "head"},
        {"qk_norm": "full", "clip_qkv": 0.3},
        {"qkv_bias": True, "o_bias": True},
    ],
)
def test_gqa_matches_naive_attention(options) -> None:
    cfg = _cfg(**options)
    attn = GroupedQueryAttention(cfg, 0).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    rope = RotaryEmbedding(DH, cfg.rope_theta, cfg.max_seq_len).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None].expand(2, 7, 7)
    assert_close(attn(x, rope, None, None, 0), _naive_attention(attn, cfg, x, causal))
    # Padding keys are invisible; a padding query still sees itself, so nothing is NaN.
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :2] = True
    pad[1, 4] = True
    allowed = causal & (~pad[:, None, :] | torch.eye(7, dtype=torch.bool))
    y = attn(x, rope, pad, None, 0)
    assert_close(y, _naive_attention(attn, cfg, x, allowed))
    assert torch.isfinite(y).all()


def test_causal_mask_cases() -> None:
    assert causal_mask(5, 0, None, torch.device("cpu")) == (None, True)
    assert causal_mask(1, 4, None, torch.device("cpu")) == (None, False)
    mask, is_causal = causal_mask(2, 3, None, torch.device("cpu"))
    assert not is_causal
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
