"""Rotary position embedding (Su et al. 2021), rotate-half layout.

Shapes: B batch, S sequence, H heads, R rotated width (even).

The rotate-half layout pairs dimension j with j + R/2 (the GPT-NeoX / Llama / Hugging
Face convention), not adjacent dimensions; checkpoints stored interleaved (DeepSeek-V3's
rope_interleave) must be permuted to this layout before `forward`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions 0 .. max_seq_len - 1.

    `rope(x_BSHR, start_pos)` rotates x whose sequence dimension (1) holds positions
    start_pos, start_pos + 1, ...; every attention class receives this object.
    """

    def __init__(self, dim: int, theta: float, max_seq_len: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim!r}")
        self.dim, self.theta, self.max_seq_len = dim, theta, max_seq_len
        self.register_buffer("cos", torch.empty(max_seq_len, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the tables, e.g. after materialising a model built on `meta`."""
        device = self.cos.device
        if device.type == "meta":
            return
        # float32 and this exact formula, as Hugging Face computes inv_freq and
        # positions * inv_freq, so the tables agree to the last bit.
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        inv_freq = 1.0 / (self.theta**exponent)
        pos = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, x_BSHR: Tensor, start_pos: int = 0) -> Tensor:
        S = x_BSHR.shape[1]
        # Tables cast to x's dtype before the multiply, as Hugging Face does.
        cos = self.cos[start_pos : start_pos + S].to(x_BSHR.dtype)[None, :, None, :]
        sin = self.sin[start_pos : start_pos + S].to(x_BSHR.dtype)[None, :, None, :]
        return x_BSHR * cos + rotate_half(x_BSHR) * sin

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}, max_seq_len={self.max_seq_len}"
