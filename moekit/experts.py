"""The expert bank: E expert MLPs with weights stacked per projection.

Shapes: N rows (tokens grouped by expert), D model dim, F expert hidden dim, E experts.
Stacked layout: w_gate_EFD, w_up_EFD [E, F, D] and w_down_EDF [E, D, F]: each expert's
slice is contiguous and laid out as nn.Linear's weight ([out, in]), as Hugging Face
checkpoints store experts, so x @ w[e].t() computes a projection.

Why [out, in] and not [in, out] (x @ w[e] with no transpose). Training matmuls do not
care: the six matmuls of an expert's forward and backward (projection and down
projection; output, input gradient, weight gradient), over eight experts, measured 916 ms
with [out, in] weights against 922 ms with [in, out] for coarse experts (1024 rows,
D=1024, F=2816), 245 against 244 ms for fine ones (512 rows, F=704) and 6.1 ms both for
the tiny preset's (D=F=128). Decoding does: with 2-3 rows per expert, MKL reads
an [in, out] weight through its general gemm path at about 2/3 of the bandwidth of the
dot-product path it takes for an [out, in] one. The decode benchmark's layer forward
(8 tokens, 8 experts of D=1024, F=2816; benchmarks/bench_layer.py) went from 1.51x to
1.07x the time to read its weights once.

Three ways to run the experts:
- `forward_expert(e, x)`: one expert, the readable truth the reference path loops over;
- `forward_grouped(x, counts)`: all experts at once. On CUDA with fp32/bf16/fp16 it uses
  torch's grouped GEMM; elsewhere (CPU, float64) a loop of plain matmuls inside one
  autograd Function (moekit.fused_experts), which on CPU measures as fast as grouped_mm's
  forward and keeps less for backward than autograd would;
- `forward_combined(x, rows, weights, counts)`: the same loop with the gather from token
  rows and the weighted combine back into them folded in, the local fast path off CUDA.

The loop writes its weight gradients, and the gate and up projections it keeps for
backward, into `step_buffers`: storage kept from the last step once nothing else holds it
(moekit.step_buffers says why and when it is safe); `step_buffers.release()` frees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.fused_experts import fused_experts
from moekit.step_buffers import StepBuffers


def _act(activation: str, gate: Tensor | None, up: Tensor) -> Tensor:
    return F.silu(gate) * up if activation == "swiglu" else F.gelu(up)


def _grouped_mm_supported(x: Tensor) -> bool:
    return (
        x.is_cuda
        and hasattr(F, "grouped_mm")
        and compute_dtype(x) in (torch.float32, torch.bfloat16, torch.float16)
    )


def _aligned(n: int, dtype: torch.dtype) -> int:
    """n rounded up to a row of a multiple of 16 bytes in dtype.

    grouped_mm refuses row strides that are not ("strides should be multiple of 16
    bytes"): D=24 passes in fp32 and fails in bf16.
    """
    per_row = 16 // (torch.finfo(dtype).bits // 8)
    return -(-n // per_row) * per_row


def _in_out(w_EOI: Tensor, dtype: torch.dtype, in_: int, out: int) -> Tensor:
    """[E, in, out] view of a stacked [E, out, in] weight in dtype, zero-padded to in_ x out."""
    w_EOI = w_EOI.to(dtype)
    pad_in, pad_out = in_ - w_EOI.shape[2], out - w_EOI.shape[1]
    if pad_in or pad_out:
        w_EOI = F.pad(w_EOI, (0, pad_in, 0, pad_out))
    return w_EOI.transpose(1, 2)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on x in: its own when autocast is off.

    torch's autocast has no rule for grouped_mm, so under bf16 autocast fp32 rows and
    weights would reach it as they are: the experts, most of the layer's FLOPs, would run
    in fp32 (on torch 2.11 through a path that synchronizes per call) while every
    nn.Linear, the reference path's experts and the dense twin run in bf16.
    """
    # Autocast leaves float64 alone, as it does for nn.Linear.
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertBank(nn.Module):
    """E expert MLPs (SwiGLU or GELU), no biases."""

    def __init__(self, config: MoEConfig, num_local_experts: int | None = None) -> None:
        super().__init__()
        self.activation = config.activation
        E = num_local_experts if num_local_experts is not None else config.num_experts
        D, Fh = config.d_model, config.d_ff
        self.num_experts = E
        gated = config.activation == "swiglu"
        self.w_gate_EFD = nn.Parameter(torch.empty(E, Fh, D)) if gated else None
        self.w_up_EFD = nn.Parameter(torch.empty(E, Fh, D))
        self.w_down_EDF = nn.Parameter(torch.empty(E, D, Fh))
        self.step_buffers = StepBuffers()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        Fh, D = self.w_up_EFD.shape[1:]
        for w in (self.w_gate_EFD, self.w_up_EFD):
            if w is not None:
                nn.init.normal_(w, std=D**-0.5)
        nn.init.normal_(self.w_down_EDF, std=Fh**-0.5)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on rows x_ND: the definition every fast path must match."""
        gate = F.linear(x_ND, self.w_gate_EFD[e]) if self.w_gate_EFD is not None else None
        h = _act(self.activation, gate, F.linear(x_ND, self.w_up_EFD[e]))
        return F.linear(h, self.w_down_EDF[e])

    def forward_grouped(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """All experts on rows grouped by expert (counts_E[e] rows for expert e, in order)."""
        if self.uses_grouped_mm(x_ND):
            return self.grouped_mm_experts(x_ND, counts_E)
        x_ND, weights = self._in_compute_dtype(x_ND)
        return fused_experts(x_ND, *weights, counts_E.tolist(), step_buffers=self.step_buffers)

    def grouped_mm_experts(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """All experts through torch's grouped GEMM, differentiable by autograd (CUDA).

        Called by forward_grouped on CUDA; torch on CPU has its forward only, which is
        enough for tests to check this arithmetic against the reference off CUDA.
        """
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        dtype = compute_dtype(x_ND)
        Fh, D = self.w_up_EFD.shape[1:]
        Fp, Dp = _aligned(Fh, dtype), _aligned(D, dtype)
        # Shapes grouped_mm refuses are zero-padded to aligned ones rather than sent to a
        # loop over experts, whose data-dependent shapes would synchronize with the GPU
        # and break CUDA graphs. Zero columns of x meet zero weight columns, zero gate
        # and up rows give zero hidden units (silu(0) = gelu(0) = 0), and the output's
        # padded columns are cut off: the same sums, with F.pad's backward routing the
        # gradients to the unpadded weights.
        x_ND = x_ND.to(dtype)
        if Dp != D:  # F.pad copies even when it pads nothing
            x_ND = F.pad(x_ND, (0, Dp - D))
        gate = None
        # grouped_mm takes [E, in, out]: the transposed views of [out, in] weights.
        if self.w_gate_EFD is not None:
            gate = F.grouped_mm(x_ND, _in_out(self.w_gate_EFD, dtype, Dp, Fp), offs=offs)
        up = F.grouped_mm(x_ND, _in_out(self.w_up_EFD, dtype, Dp, Fp), offs=offs)
        h = _act(self.activation, gate, up)
        y_ND = F.grouped_mm(h, _in_out(self.w_down_EDF, dtype, Fp, Dp), offs=offs)
        return y_ND if Dp == D else y_ND[:, :D]

    def uses_grouped_mm(self, x: Tensor) -> bool:
        """True where forward_grouped runs torch's grouped GEMM: CUDA, fp32/bf16/fp16 (after
        autocast), any D and F (zero-padded to 16-byte rows where they are not)."""
        return _grouped_mm_supported(x)

    def forward_combined(
        self, x_TD: Tensor, rows_A: Tensor, weight_A: Tensor, counts_E: Tensor
    ) -> Tensor:
        """sum_a weight_A[a] * expert(x_TD[rows_A[a]]) into token rows [T, D], in one pass.

        rows_A, weight_A [A] are grouped by expert, counts_E[e] assignments for expert e.
        Gather, experts and weighted combine share one backward (moekit.fused_experts),
        which keeps only the gate and up projections: the fast path wherever grouped_mm
        does not run.
        """
        x_TD, weights = self._in_compute_dtype(x_TD)
        return fused_experts(
            x_TD,
            *weights,
            counts_E.tolist(),
            rows_A=rows_A,
            weight_A=weight_A.to(x_TD.dtype),
            step_buffers=self.step_buffers,
        )

    def _in_compute_dtype(self, x: Tensor) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """x and the stacked weights (gate, up, down) in the dtype autocast would compute in.

        Autocast has no say inside the fused loop's autograd Function (its matmuls write
        into buffers), so under bf16 autocast it would run in fp32 and return fp32 where
        the reference loop, nn.Linear and grouped_mm return bf16. Casting here, as
        autocast would, keeps every path in one dtype; the casts' backward returns the
        gradients to the fp32 weights.
        """
        weights = (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF)
        if not torch.is_autocast_enabled(x.device.type):
            return x, weights
        dtype = compute_dtype(x)
        return x.to(dtype), tuple(None if w is None else w.to(dtype) for w in weights)
