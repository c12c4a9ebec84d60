"""The CPU fast path: every expert MLP, gather and weighted combine in one autograd Function.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, A assignments (rows grouped
by expert), N rows of one expert.

Why a hand-written backward. Left to autograd, a loop of `x[tok] @ w` per expert keeps
the gathered rows [A, D], the gate and up projections, silu(gate), their product [A, F]
each and the expert outputs [A, D] (for the router weights' gradient) alive until
backward. This Function keeps only gate and up [A, F]: the gathered rows are gathered
again from x (a copy, far cheaper than a matmul), the activation is recomputed, and the
router weights' gradient uses <dL/dy_a, y_a> = <dL/dy_a @ w_down^T, h_a>, so y_a itself
is never stored. Working expert by expert also keeps each step's [N, F] temporaries in
cache, where a dense layer streams [T, K*F] arrays through memory.

On CPU torch's grouped_mm has a forward but no backward (torch 2.13), and a loop of
plain matmuls measures as fast as its forward, so the loop is the kernel here. CUDA
uses grouped_mm through `ExpertBank.forward_grouped` instead.

Decoding (a handful of tokens, no autograd): experts without rows are skipped, so each
touched expert's weights are read once, by a skinny matmul. Per-token weight gather
(w[expert_A] as [A, D, F] copies, then a batched matvec) is fine for batch-1 decoding,
wasteful for training; here it would copy each weight once per assignment where the
loop reads it once, so it is not used. What is left above the weight-read floor is
MKL's gemm path for 2-8 rows, which streams a [D, F] weight at about 2/3 of the
bandwidth of its 1-row (gemv) path: benchmarks/bench_layer.py measures about 1.5x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _activate(gate: Tensor | None, up: Tensor) -> Tensor:
    return F.silu(gate) * up if gate is not None else F.gelu(up)


def _recompute(gate: Tensor | None, up: Tensor) -> tuple[Tensor, Tensor | None]:
    """h = act(gate, up) and silu(gate) (None for GELU), recomputed for the backward."""
    if gate is None:
        return F.gelu(up), None
    silu = F.silu(gate)
    return silu * up, silu


def _activate_backward(
    dh: Tensor, gate: Tensor | None, up: Tensor, silu: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """(dL/dgate, dL/dup) from dL/dh; dh's storage is reused."""
    if gate is None:
        return None, torch.ops.aten.gelu_backward(dh, up)
    d_up = dh * silu
    # aten's fused silu_backward: one pass instead of four elementwise ops.
    return torch.ops.aten.silu_backward(dh.mul_(up), gate), d_up


def _grad_buffer(w_EXY: Tensor, counts: list[int]) -> Tensor:
    """Uninitialised [E, X, Y] gradient; experts with no rows (never written) get zeros."""
    grad = torch.empty_like(w_EXY)
    for e, n in enumerate(counts):
        if n == 0:
            grad[e].zero_()
    return grad


def _forward_loop(
    x: Tensor,
    w_gate: Tensor | None,
    w_up: Tensor,
    w_down: Tensor,
    weight_A: Tensor | None,
    rows_A: Tensor | None,
    counts: list[int],
    num_out: int,
    keep: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Output, and (when keep) the gate and up projections [A, F] for backward."""
    A, Fh = sum(counts), w_up.shape[-1]
    gate_AF = x.new_empty(A, Fh) if keep and w_gate is not None else None
    up_AF = x.new_empty(A, Fh) if keep else None
    combine = rows_A is not None
    out = x.new_zeros(num_out, x.shape[1]) if combine else x.new_empty(A, x.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sl = slice(start, start + n)
        start += n
        x_ND = x.index_select(0, rows_A[sl]) if combine else x[sl]
        gate = None
        if w_gate is not None:
            gate = torch.mm(x_ND, w_gate[e], out=gate_AF[sl]) if keep else x_ND @ w_gate[e]
        up = torch.mm(x_ND, w_up[e], out=up_AF[sl]) if keep else x_ND @ w_up[e]
        h = _activate(gate, up)
        if not combine:
            torch.mm(h, w_down[e], out=out[sl])
            continue
        y = h @ w_down[e]
        if weight_A is not None:
            y.mul_(weight_A[sl, None])
        # Expert after expert, in token order within each: the reference's summation order.
        out.index_add_(0, rows_A[sl], y)
    return out, gate_AF, up_AF


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, weight_A, rows_A, counts, num_out):
        out, gate_AF, up_AF = _forward_loop(
            x, w_gate, w_up, w_down, weight_A, rows_A, counts, num_out, keep=True
        )
        ctx.save_for_backward(x, w_gate, w_up, w_down, weight_A, rows_A, gate_AF, up_AF)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_gate, w_up, w_down, weight_A, rows_A, gate_AF, up_AF = ctx.saved_tensors
        need_x, need_wg, need_wu, need_wd, need_weight = ctx.needs_input_grad[:5]
        combine = rows_A is not None
        grad_out = grad_out.contiguous()
        counts = ctx.counts
        dx = None
        if need_x:
            dx = torch.zeros_like(x) if combine else x.new_empty(x.shape)
        dwg = _grad_buffer(w_gate, counts) if need_wg else None
        dwu = _grad_buffer(w_up, counts) if need_wu else None
        dwd = _grad_buffer(w_down, counts) if need_wd else None
        dweight = torch.empty_like(weight_A) if need_weight else None
        # Scale whichever of dL/dy [N, D] or h [N, F] is narrower by the router weights.
        scale_dy = w_up.shape[1] <= w_up.shape[2]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            start += n
            dy_ND = grad_out.index_select(0, rows_A[sl]) if combine else grad_out[sl]
            gate = gate_AF[sl] if gate_AF is not None else None
            # dL/dh before the router weight, whose own gradient is <dL/dh, h>.
            dh = dy_ND @ w_down[e].t()
            h, silu = _recompute(gate, up_AF[sl])
            if weight_A is not None:
                w_N1 = weight_A[sl, None]
                if need_weight:
                    dweight[sl] = torch.linalg.vecdot(dh, h)
                dh.mul_(w_N1)
                if need_wd and scale_dy:
                    torch.mm(h.t(), dy_ND * w_N1, out=dwd[e])
                elif need_wd:
                    torch.mm((h * w_N1).t(), dy_ND, out=dwd[e])
            elif need_wd:
                torch.mm(h.t(), dy_ND, out=dwd[e])
            if not (need_x or need_wg or need_wu):
                continue
            d_gate, d_up = _activate_backward(dh, gate, up_AF[sl], silu)
            x_ND = x.index_select(0, rows_A[sl]) if combine else x[sl]
            if need_wu:
                torch.mm(x_ND.t(), d_up, out=dwu[e])
            if need_wg and d_gate is not None:
                torch.mm(x_ND.t(), d_gate, out=dwg[e])
            if need_x:
                dx_ND = torch.mm(d_up, w_up[e].t(), out=None if combine else dx[sl])
                if d_gate is not None:
                    dx_ND.addmm_(d_gate, w_gate[e].t())
                if combine:
                    dx.index_add_(0, rows_A[sl], dx_ND)
        return dx, dwg, dwu, dwd, dweight, None, None, None


def fused_experts(
    x: Tensor,
    w_gate_EDF: Tensor | None,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    counts: list[int],
    rows_A: Tensor | None = None,
    weight_A: Tensor | None = None,
    num_out: int | None = None,
) -> Tensor:
    """Run E expert MLPs over assignments grouped by expert, on CPU or in float64.

    Args:
        x: [T, D] token rows, or [A, D] rows already grouped by expert when rows_A is None.
        w_gate_EDF, w_up_EDF: [E, D, F] (w_gate None for the GELU MLP); w_down_EFD [E, F, D].
        counts: E ints, the number of assignments of each expert, in order.
        rows_A: [A] long, the token row of each grouped assignment. When given, rows are
            gathered from x and the outputs scattered back, summed per token, into
            [num_out, D]; when None the result is the [A, D] per-row expert outputs.
        weight_A: [A] combine weights multiplying each assignment's output (with rows_A).
        num_out: rows of the combined output (default T).

    Returns: [num_out, D] with rows_A, else [A, D]. Differentiable in x, the weights and
    weight_A; only gate and up [A, F] are kept for backward.
    """
    if rows_A is None and weight_A is not None:
        raise ValueError("weight_A needs rows_A: weighted outputs are combined per token")
    num_out = x.shape[0] if num_out is None else num_out
    params = [t for t in (x, w_gate_EDF, w_up_EDF, w_down_EFD, weight_A) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return _FusedExperts.apply(
            x, w_gate_EDF, w_up_EDF, w_down_EFD, weight_A, rows_A, counts, num_out
        )
    out, _, _ = _forward_loop(
        x, w_gate_EDF, w_up_EDF, w_down_EFD, weight_A, rows_A, counts, num_out, keep=False
    )
    return out
