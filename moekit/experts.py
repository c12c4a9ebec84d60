"""The expert bank: E expert MLPs with weights stacked per projection.

Shapes: N rows (tokens grouped by expert), D model dim, F expert hidden dim, E experts.
Stacked layout: w_gate_EDF, w_up_EDF [E, D, F] and w_down_EFD [E, F, D], so x @ w needs
no transpose and one expert's slice is contiguous.

Two ways to run rows already grouped by expert:
- `forward_expert(e, x)`: one expert, the readable truth the reference path loops over;
- `forward_grouped(x, counts)`: all experts at once. On CUDA with fp32/bf16/fp16 it uses
  torch's grouped GEMM; elsewhere (CPU, float64) a loop of plain matmuls over
  `unbind`-ed weight slices, which on CPU measures as fast as grouped_mm and, unlike
  indexing `w[e]`, gives the weight gradient in one stack instead of E full-size zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig


def _act(activation: str, gate: Tensor | None, up: Tensor) -> Tensor:
    return F.silu(gate) * up if activation == "swiglu" else F.gelu(up)


def _grouped_mm_supported(x: Tensor) -> bool:
    return (
        x.is_cuda
        and hasattr(F, "grouped_mm")
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


class ExpertBank(nn.Module):
    """E expert MLPs (SwiGLU or GELU), no biases."""

    def __init__(self, config: MoEConfig, num_local_experts: int | None = None) -> None:
        super().__init__()
        self.activation = config.activation
        E = num_local_experts if num_local_experts is not None else config.num_experts
        D, Fh = config.d_model, config.d_ff
        self.num_experts = E
        gated = config.activation == "swiglu"
        self.w_gate_EDF = nn.Parameter(torch.empty(E, D, Fh)) if gated else None
        self.w_up_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.w_down_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        D, Fh = self.w_up_EDF.shape[1:]
        for w in (self.w_gate_EDF, self.w_up_EDF):
            if w is not None:
                nn.init.normal_(w, std=D**-0.5)
        nn.init.normal_(self.w_down_EFD, std=Fh**-0.5)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on rows x_ND: the definition every fast path must match."""
        gate = x_ND @ self.w_gate_EDF[e] if self.w_gate_EDF is not None else None
        return _act(self.activation, gate, x_ND @ self.w_up_EDF[e]) @ self.w_down_EFD[e]

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """All experts on rows grouped by expert (counts_E[e] rows for expert e, in order)."""
        if _grouped_mm_supported(x_ND):
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            gate = None
            if self.w_gate_EDF is not None:
                gate = F.grouped_mm(x_ND, self.w_gate_EDF.to(x_ND.dtype), offs=offs)
            up = F.grouped_mm(x_ND, self.w_up_EDF.to(x_ND.dtype), offs=offs)
            h = _act(self.activation, gate, up)
            return F.grouped_mm(h, self.w_down_EFD.to(x_ND.dtype), offs=offs)
        counts = counts_E.tolist()
        xs = x_ND.split(counts)
        gates = self.w_gate_EDF.unbind(0) if self.w_gate_EDF is not None else [None] * len(xs)
        outs = []
        for x, wg, wu, wd, n in zip(
            xs, gates, self.w_up_EDF.unbind(0), self.w_down_EFD.unbind(0), counts, strict=True
        ):
            if n == 0:
                continue
            gate = x @ wg if wg is not None else None
            outs.append(_act(self.activation, gate, x @ wu) @ wd)
        if not outs:
            # No rows at all: tie the empty output to the weights so their gradients
            # are zeros rather than None (zero-token batches must not break optimizers).
            anchor = sum(w.sum() for w in self.parameters()) * 0
            return x_ND.new_zeros(0, x_ND.shape[1]) + anchor
        return torch.cat(outs) if len(outs) > 1 else outs[0]
