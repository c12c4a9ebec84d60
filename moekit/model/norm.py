"""RMSNorm, computed the way Hugging Face checkpoints expect.

Shapes: any [..., N]; the statistic is over the last dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), no bias, no centring."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        # Statistic in at least float32 (bf16 squares lose the mean); cast back *before*
        # the weight multiply, the order of the Llama/Mixtral/Qwen/OLMoE/DeepSeek code,
        # so bf16 results match those checkpoints bit for bit.
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
