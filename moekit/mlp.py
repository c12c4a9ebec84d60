"""The dense feed-forward block: SwiGLU or GELU MLP. Used for shared experts and dense layers.

Shapes: T tokens, D model dim, F hidden dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); GELU: down(gelu(up(x))). No biases.

    Weights are nn.Linear layouts ([F, D] for gate/up, [D, F] for down), the layout of
    Hugging Face checkpoints, so dense layers and shared experts load without transposes.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False) if activation == "swiglu" else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is not None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x))
        return self.down_proj(h)
