"""Rotary position embedding (Su et al. 2021), rotate-half layout, with optional YaRN scaling.

Shapes: B batch, S sequence, H heads, R rotated width (even).

The rotate-half layout pairs dimension j with j + R/2 (the GPT-NeoX / Llama / Hugging
Face convention), not adjacent dimensions; checkpoints stored interleaved (DeepSeek-V3's
rope_interleave) must be permuted to this layout before `forward`.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
Models") stretches a model trained on `original_max_seq_len` positions by `factor`:
frequency pairs that turn many times over the original context keep their frequency
(extrapolation), pairs that turn less than once are divided by `factor` (position
interpolation), and a linear ramp blends the two in between (§3.2, "NTK-by-parts"). The
cos/sin tables are then multiplied by an attention factor (§3.4, "temperature"), which
scales every query-key rotary dot product by its square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ROPE_TYPES = ("default", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's 0.1 * mscale * ln(factor) + 1 (§3.4, sqrt(1/t)); 1 when not stretching."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Yarn:
    """YaRN settings, taken from a validated ModelConfig (`ModelConfig.yarn`)."""

    factor: float
    """Context stretch: new context length / original_max_seq_len."""
    original_max_seq_len: int
    """Context length the model was pretrained on."""
    beta_fast: float = 32.0
    """Pairs turning more than beta_fast times over the original context are kept as is."""
    beta_slow: float = 1.0
    """Pairs turning fewer than beta_slow times are fully interpolated (divided by factor)."""
    mscale: float | None = None
    """DeepSeek's numerator coefficient of the attention factor; None = plain YaRN."""
    mscale_all_dim: float | None = None
    """DeepSeek's denominator coefficient of the attention factor (and MLA softmax scale)."""
    attention_factor: float | None = None
    """Explicit cos/sin multiplier; None = derived from factor (and mscale, mscale_all_dim)."""
    truncate: bool = True
    """Round the ramp's ends outwards to whole dimensions, as the reference code does."""

    @property
    def table_scale(self) -> float:
        """The multiplier of the cos/sin tables (YaRN §3.4)."""
        if self.attention_factor is not None:
            return self.attention_factor
        # DeepSeek-V3 writes the factor as a ratio of two mscales; with mscale ==
        # mscale_all_dim (its release) the tables are unscaled and the temperature moves into
        # the softmax scale instead (see `softmax_scale_factor`).
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return yarn_mscale(self.factor)

    @property
    def softmax_scale_factor(self) -> float:
        """mscale(factor, mscale_all_dim), whose square multiplies MLA's softmax scale.

        DeepSeek-V3 (and transformers' port) applies it to the whole q.k score, nope and
        rope parts alike; 1.0 when mscale_all_dim is unset or 0.
        """
        if not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim)

    def inv_freq(self, dim: int, theta: float, device: torch.device | None = None) -> Tensor:
        """float32 [dim / 2] inverse frequencies, blended per YaRN's NTK-by-parts ramp."""
        # float32 and this operation order, as transformers' _compute_yarn_parameters, so the
        # tables agree to the last bit.
        pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extrapolated = 1.0 / pos_freqs
        interpolated = 1.0 / (self.factor * pos_freqs)
        low, high = self._ramp_ends(dim, theta)
        if low == high:
            # A one-point ramp (both ends clamped to pair 0 when the original context is a
            # few positions) would give 0 / 0 there; widened as transformers widens it.
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = (1 - ramp).to(device)
        return interpolated * (1 - keep) + extrapolated * keep

    def _ramp_ends(self, dim: int, theta: float) -> tuple[float, float]:
        # The pair index d whose wavelength 2*pi*theta^(2d/dim) fits r times into the
        # original context: d = dim * ln(L / (2*pi*r)) / (2 ln theta) (YaRN eq. 17).
        def pair_index(rotations: float) -> float:
            wavelengths = self.original_max_seq_len / (rotations * 2 * math.pi)
            return (dim * math.log(wavelengths)) / (2 * math.log(theta))

        low, high = pair_index(self.beta_fast), pair_index(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions 0 .. max_seq_len - 1.

    `rope(x_BSHR, start_pos)` rotates x whose sequence dimension (1) holds positions
    start_pos, start_pos + 1, ...; every attention class receives this object. With `yarn`
    the frequencies and table scale are YaRN's; without, plain RoPE.
    """

    def __init__(self, dim: int, theta: float, max_seq_len: int, yarn: Yarn | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim!r}")
        self.dim, self.theta, self.max_seq_len, self.yarn = dim, theta, max_seq_len, yarn
        self.register_buffer("cos", torch.empty(max_seq_len, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the tables, e.g. after materialising a model built on `meta`."""
        device = self.cos.device
        if device.type == "meta":
            return
        if self.yarn is None:
            # float32 and this exact formula, as Hugging Face computes inv_freq and
            # positions * inv_freq, so the tables agree to the last bit.
            exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
            inv_freq = 1.0 / (self.theta**exponent)
        else:
            inv_freq = self.yarn.inv_freq(self.dim, self.theta, device)
        pos = torch.arange(self.max_seq_len, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.yarn is None:
            self.cos.copy_(emb.cos())
            self.sin.copy_(emb.sin())
        else:
            scale = self.yarn.table_scale
            self.cos.copy_(emb.cos() * scale)
            self.sin.copy_(emb.sin() * scale)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating buffer: the tables would be rounded,
        # and a cast back would not restore them. They stay at least float32 (forward casts
        # them to x's dtype per call, as Hugging Face does), recomputed where cast below.
        super()._apply(fn, recurse)
        keep = torch.promote_types(self.cos.dtype, torch.float32)
        if self.cos.dtype != keep:
            self.cos, self.sin = self.cos.to(keep), self.sin.to(keep)
            self.reset_parameters()
        return self

    def forward(self, x_BSHR: Tensor, start_pos: int = 0) -> Tensor:
        S = x_BSHR.shape[1]
        # Tables cast to x's dtype before the multiply, as Hugging Face does.
        cos = self.cos[start_pos : start_pos + S].to(x_BSHR.dtype)[None, :, None, :]
        sin = self.sin[start_pos : start_pos + S].to(x_BSHR.dtype)[None, :, None, :]
        return x_BSHR * cos + rotate_half(x_BSHR) * sin

    def extra_repr(self) -> str:
        tail = "" if self.yarn is None else f", yarn={self.yarn}"
        return f"dim={self.dim}, theta={self.theta}, max_seq_len={self.max_seq_len}{tail}"
