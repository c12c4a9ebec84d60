"""The CPU fast path: every expert MLP, gather and weighted combine in one autograd Function.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, A assignments (rows grouped
by expert), N rows of one expert.

Why a hand-written backward. Left to autograd, a loop of `x[tok] @ w` per expert keeps
the gathered rows [A, D], the gate and up projections, silu(gate), their product [A, F]
each and the expert outputs [A, D] (for the router weights' gradient) alive until
backward. This Function keeps only gate and up [A, F]: the gathered rows are gathered
again from x (a copy, far cheaper than a matmul; kept instead when small, see
_KEEP_ROWS_BYTES, and then x itself is not kept: like the reference path, the layer's
input may then change in place after the forward), the activation is recomputed, and
the router weights' gradient uses <dL/dy_a, y_a> = <dL/dh_a, h_a> with
dL/dh_a = dL/dy_a @ w_down[e] ([D, F]), so y_a itself is never stored. Working expert by
expert also keeps each step's [N, F] temporaries in cache, where a dense layer streams
[T, K*F] arrays through memory.

The backward is written for one differentiation (no jvp): a backward with
create_graph=True (gradient penalties, Hessians) is refused at once, and double backward
needs the reference path; forward-mode AD gets it (moekit.paths).

On CPU torch's grouped_mm has a forward but no backward (torch 2.13), and a loop of
plain matmuls measures as fast as its forward, so the loop is the kernel here. CUDA
uses grouped_mm through `ExpertBank.forward_grouped` instead.

Threads: experts may run in row-balanced groups side by side (moekit/expert_threads.py);
each group sums into its own output (and dx) buffer and the buffers are added in group
order, so results do not depend on thread timing.

Weights are [E, out, in] (moekit.experts says why), so a projection is x @ w[e].t() and
a weight's gradient is dL/d(out)^T @ in, written straight into its [out, in] slice.

Decoding (a handful of tokens, no autograd): experts without rows are skipped, so each
touched expert's weights are read once, by a skinny matmul over an [out, in] weight,
which MKL runs as dot products at about the speed of reading the weight. Per-token
weight gather (w[expert_A] as [A, F, D] copies, then a batched matvec) is fine for
batch-1 decoding, wasteful for training; here it would copy each weight once per
assignment where the loop reads it once, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.expert_scatter import ExpertScatter
from moekit.expert_threads import expert_groups, side_by_side
from moekit.step_buffers import StepBuffers


def _activate(gate: Tensor | None, up: Tensor, kept: bool) -> Tensor:
    """act(gate, up) into fresh storage, or into gate's / up's when they are not kept."""
    if gate is None:
        return F.gelu(up)
    return F.silu(gate, inplace=not kept).mul_(up)


def _recompute(gate: Tensor | None, up: Tensor) -> tuple[Tensor, Tensor | None]:
    """h = act(gate, up) and silu(gate) (None for GELU), recomputed for the backward."""
    if gate is None:
        return F.gelu(up), None
    silu = F.silu(gate)
    return torch.mul(silu, up), silu


def _activate_backward(
    dh: Tensor, gate: Tensor | None, up: Tensor, silu: Tensor | None
) -> tuple[Tensor | None, Tensor]:
    """(dL/dgate, dL/dup) from dL/dh; dh's storage is reused."""
    if gate is None:
        return None, torch.ops.aten.gelu_backward(dh, up)
    d_up = dh * silu
    # aten's fused silu_backward: one pass instead of four elementwise ops.
    return torch.ops.aten.silu_backward(dh.mul_(up), gate), d_up


def _grad_buffer(
    w_EXY: Tensor, counts: list[int], buffers: StepBuffers | None, name: str
) -> Tensor:
    """Uninitialised [E, X, Y] gradient; experts with no rows (never written) get zeros.

    From `buffers` when given: every other expert's slice is overwritten by its matmul,
    so last step's storage serves as well as new pages and skips the kernel zeroing them.
    """
    grad = torch.empty_like(w_EXY) if buffers is None else buffers.take(name, w_EXY)
    for e, n in enumerate(counts):
        if n == 0:
            grad[e].zero_()
    return grad


_KEEP_ROWS_BYTES = 16 * 2**20
"""Largest gathered input [A, D] kept from forward for backward instead of gathered again.

Small ones come from reused heap memory, and keeping them saves an index_select per
expert in backward: the tiny preset's layer (4 MiB) went from 19.2-19.9 to 18.7-19.4 ms
forward+backward. Large ones are fresh pages, which cost more than the gathers: the coarse
benchmark layer (33.5 MB) went from 1559-1595 to 1589-1619 ms when kept."""


def _keeps_rows(x: Tensor, num_rows: int) -> bool:
    return num_rows * x.shape[1] * x.element_size() <= _KEEP_ROWS_BYTES


@dataclass(frozen=True)
class _Experts:
    """What every expert step reads: the rows, the weights and where each expert's rows lie.

    rows_A None: x already holds the rows grouped by expert ([A, D]) and results stay per
    row; otherwise rows are gathered from tokens and results summed back into them.
    """

    x: Tensor
    w_gate: Tensor | None
    w_up: Tensor
    w_down: Tensor
    weight_A: Tensor | None
    rows_A: Tensor | None
    counts: list[int]

    @cached_property
    def starts(self) -> list[int]:
        """First grouped row of each expert."""
        return [0, *accumulate(self.counts)][:-1]

    @property
    def combine(self) -> bool:
        return self.rows_A is not None

    def span(self, e: int) -> slice:
        return slice(self.starts[e], self.starts[e] + self.counts[e])

    def rows(self, sl: slice, x_AD: Tensor | None) -> Tensor:
        """An expert's input rows [N, D]: kept, gathered from tokens, or already grouped."""
        if x_AD is not None:
            return x_AD[sl]
        return self.x.index_select(0, self.rows_A[sl]) if self.combine else self.x[sl]

    def scatter(self, experts: list[int], per_expert: bool) -> ExpertScatter:
        return ExpertScatter(self.x, self.rows_A, experts, self.counts, self.starts, per_expert)


@dataclass(frozen=True)
class _Kept:
    """What the forward keeps for the backward: gate and up [A, F], maybe the rows [A, D]."""

    gate_AF: Tensor | None
    up_AF: Tensor | None
    x_AD: Tensor | None


def _forward_experts(
    experts: list[int], ex: _Experts, kept: _Kept, out: Tensor, per_expert: bool
) -> Tensor:
    """The listed experts' outputs, summed into `out` (combine) or written to their rows."""
    w_gate, w_up, w_down, weight_A = ex.w_gate, ex.w_up, ex.w_down, ex.weight_A
    gate_AF, up_AF = kept.gate_AF, kept.up_AF
    # Scale whichever of h [N, F] or y [N, D] is narrower by the router weights.
    scale_h = w_up.shape[1] < w_up.shape[2]
    scatter = ex.scatter(experts, per_expert) if ex.combine and experts else None
    for e in experts:
        sl = ex.span(e)
        x_ND = ex.rows(sl, kept.x_AD)
        gate = None
        if w_gate is not None:
            gate = torch.mm(x_ND, w_gate[e].t(), out=None if gate_AF is None else gate_AF[sl])
        up = torch.mm(x_ND, w_up[e].t(), out=None if up_AF is None else up_AF[sl])
        h = _activate(gate, up, kept=up_AF is not None)
        if scatter is None:
            torch.mm(h, w_down[e].t(), out=out[sl])
            continue
        if weight_A is not None and scale_h:
            h.mul_(weight_A[sl, None])
        y = torch.mm(h, w_down[e].t(), out=scatter.rows(sl))
        if weight_A is not None and not scale_h:
            y.mul_(weight_A[sl, None])
        scatter.written(out, sl, y)
    if scatter is not None:
        scatter.finish(out)
    return out


def _kept_projection(x: Tensor, A: int, Fh: int, buffers: StepBuffers | None, name: str) -> Tensor:
    """[A, F] storage for a projection kept for backward: last step's when free."""
    return x.new_empty(A, Fh) if buffers is None else buffers.take(name, x, (A, Fh))


def _forward_loop(
    ex: _Experts, num_out: int, keep: bool, split: bool | None, buffers: StepBuffers | None
) -> tuple[Tensor, _Kept]:
    """Output, and (when keep) what backward needs: gate, up [A, F] and maybe x's rows."""
    x = ex.x
    A, Fh = sum(ex.counts), ex.w_up.shape[1]
    kept = _Kept(
        gate_AF=(
            _kept_projection(x, A, Fh, buffers, "gate_AF")
            if keep and ex.w_gate is not None
            else None
        ),
        up_AF=_kept_projection(x, A, Fh, buffers, "up_AF") if keep else None,
        x_AD=x.index_select(0, ex.rows_A) if keep and ex.combine and _keeps_rows(x, A) else None,
    )
    groups = expert_groups(ex.counts, split, ex.w_up.shape[2], Fh)
    out_AD = None if ex.combine else x.new_empty(A, x.shape[1])

    def task(i: int):
        # Combining, each group sums into its own [num_out, D]; those are added in group
        # order afterwards, so the result does not depend on thread timing.
        out = x.new_zeros(num_out, x.shape[1]) if ex.combine else out_AD
        return lambda: _forward_experts(groups[i], ex, kept, out, len(groups) > 1)

    tasks = [task(i) for i in range(len(groups))]
    outs = [tasks[0]()] if len(tasks) == 1 else side_by_side(tasks)
    out = outs[0]
    if ex.combine:
        for other in outs[1:]:
            out.add_(other)
    return out, kept


class _Grads:
    """Gradient buffers of one backward; experts write disjoint slices of them."""

    def __init__(self, needs: tuple[bool, ...], ex: _Experts, buffers: StepBuffers | None):
        need_wg, need_wu, need_wd, need_weight = needs
        counts = ex.counts
        self.dwg = _grad_buffer(ex.w_gate, counts, buffers, "gate") if need_wg else None
        self.dwu = _grad_buffer(ex.w_up, counts, buffers, "up") if need_wu else None
        self.dwd = _grad_buffer(ex.w_down, counts, buffers, "down") if need_wd else None
        self.dweight = torch.empty_like(ex.weight_A) if need_weight else None


def _backward_experts(
    experts: list[int],
    ex: _Experts,
    kept: _Kept,
    grad_out: Tensor,
    g: _Grads,
    dx: Tensor | None,
    per_expert: bool,
) -> Tensor | None:
    """The listed experts' gradients; dx is summed into (combine) or written to their rows."""
    w_gate, w_up, w_down, weight_A = ex.w_gate, ex.w_up, ex.w_down, ex.weight_A
    gate_AF, up_AF = kept.gate_AF, kept.up_AF
    dwg, dwu, dwd, dweight = g.dwg, g.dwu, g.dwd, g.dweight
    # Scale whichever of dL/dy [N, D] or h [N, F] is narrower by the router weights.
    scale_dy = w_up.shape[2] <= w_up.shape[1]
    # As in forward: the same buffer choice and the same order of sums.
    scatter = ex.scatter(experts, per_expert) if ex.combine and dx is not None and experts else None
    for e in experts:
        sl = ex.span(e)
        dy_ND = grad_out.index_select(0, ex.rows_A[sl]) if ex.combine else grad_out[sl]
        gate = gate_AF[sl] if gate_AF is not None else None
        # dL/dh before the router weight, whose own gradient is <dL/dh, h>.
        dh = dy_ND @ w_down[e]
        h, silu = _recompute(gate, up_AF[sl])
        if weight_A is not None:
            w_N1 = weight_A[sl, None]
            if dweight is not None:
                dweight[sl] = torch.linalg.vecdot(dh, h)
            dh.mul_(w_N1)
            if dwd is not None and scale_dy:
                torch.mm((dy_ND * w_N1).t(), h, out=dwd[e])
            elif dwd is not None:
                torch.mm(dy_ND.t(), h.mul_(w_N1), out=dwd[e])
        elif dwd is not None:
            torch.mm(dy_ND.t(), h, out=dwd[e])
        if dx is None and dwg is None and dwu is None:
            continue
        d_gate, d_up = _activate_backward(dh, gate, up_AF[sl], silu)
        x_ND = ex.rows(sl, kept.x_AD)
        if dwu is not None:
            torch.mm(d_up.t(), x_ND, out=dwu[e])
        if dwg is not None and d_gate is not None:
            torch.mm(d_gate.t(), x_ND, out=dwg[e])
        if dx is not None:
            rows = scatter.rows(sl) if scatter is not None else dx[sl]
            dx_ND = torch.mm(d_up, w_up[e], out=rows)
            if d_gate is not None:
                dx_ND.addmm_(d_gate, w_gate[e])
            if scatter is not None:
                scatter.written(dx, sl, dx_ND)
    if scatter is not None:
        scatter.finish(dx)
    return dx


class _FusedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, weight_A, rows_A, counts, num_out, split, buffers):
        ex = _Experts(x, w_gate, w_up, w_down, weight_A, rows_A, counts)
        out, kept = _forward_loop(ex, num_out, True, split, buffers)
        # With its rows kept, backward needs only x's shape: saving x too would refuse
        # what the reference path allows (x changed in place after the forward, x made
        # under inference mode).
        saved_x = x if kept.x_AD is None else None
        ctx.save_for_backward(
            saved_x, w_gate, w_up, w_down, weight_A, rows_A, kept.gate_AF, kept.up_AF, kept.x_AD
        )
        ctx.counts, ctx.split, ctx.buffers, ctx.x_shape = counts, split, buffers, x.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # torch's once_differentiable refuses a second differentiation only when grad_out
        # itself needs a gradient: for y.sum() (a constant grad_out) it returned a gradient
        # with no graph, and the Hessian left the experts' terms out, silently.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused experts' backward cannot differentiate twice (backward with "
                "create_graph=True): build the layer with impl='reference' for gradient "
                "penalties or second derivatives"
            )
        with torch.no_grad():
            return _FusedExperts._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, w_gate, w_up, w_down, weight_A, rows_A, gate_AF, up_AF, x_AD = ctx.saved_tensors
        if x is None:
            # Rows kept (always gathered ones): x stands in for its shape, dtype and
            # device only, as a zero-stride view that holds no memory.
            x = x_AD.new_empty(()).expand(ctx.x_shape)
        counts = ctx.counts
        ex = _Experts(x, w_gate, w_up, w_down, weight_A, rows_A, counts)
        kept = _Kept(gate_AF, up_AF, x_AD)
        need_x = ctx.needs_input_grad[0]
        grad_out = grad_out.contiguous()
        g = _Grads(ctx.needs_input_grad[1:5], ex, ctx.buffers)
        groups = expert_groups(counts, ctx.split, w_up.shape[2], w_up.shape[1])
        dx_rows = x.new_empty(x.shape) if need_x and not ex.combine else None

        def task(i: int):
            # As in forward: combining, each group sums dx into its own buffer, and the
            # buffers are added in group order.
            dx = torch.zeros_like(x) if need_x and ex.combine else dx_rows
            return lambda: _backward_experts(groups[i], ex, kept, grad_out, g, dx, len(groups) > 1)

        tasks = [task(i) for i in range(len(groups))]
        dxs = [tasks[0]()] if len(tasks) == 1 else side_by_side(tasks)
        dx = dxs[0]
        if dx is not None and ex.combine:
            for other in dxs[1:]:
                dx.add_(other)
        return dx, g.dwg, g.dwu, g.dwd, g.dweight, None, None, None, None, None


def fused_experts(
    x: Tensor,
    w_gate_EFD: Tensor | None,
    w_up_EFD: Tensor,
    w_down_EDF: Tensor,
    counts: list[int],
    rows_A: Tensor | None = None,
    weight_A: Tensor | None = None,
    num_out: int | None = None,
    split: bool | None = None,
    step_buffers: StepBuffers | None = None,
) -> Tensor:
    """Run E expert MLPs over assignments grouped by expert, on CPU or in float64.

    Args:
        x: [T, D] token rows, or [A, D] rows already grouped by expert when rows_A is None.
        w_gate_EFD, w_up_EFD: [E, F, D] (w_gate None for the GELU MLP); w_down_EDF [E, D, F].
        counts: E ints, the number of assignments of each expert, in order.
        rows_A: [A] long, the token row of each grouped assignment. When given, rows are
            gathered from x and the outputs scattered back, summed per token, into
            [num_out, D]; when None the result is the [A, D] per-row expert outputs.
        weight_A: [A] combine weights multiplying each assignment's output (with rows_A).
        num_out: rows of the combined output (default T).
        split: run groups of experts side by side on separate threads (True), in one
            loop using every intra-op thread (False), or choose from the shapes (None).
        step_buffers: where the weights' gradients and the kept gate and up projections
            are written, reused from the last step when nothing else holds them
            (moekit.step_buffers); None allocates.

    Returns: [num_out, D] with rows_A, else [A, D]. Differentiable in x, the weights and
    weight_A; gate and up [A, F] are kept for backward (and the gathered rows when small).
    """
    if rows_A is None and weight_A is not None:
        raise ValueError("weight_A needs rows_A: weighted outputs are combined per token")
    num_out = x.shape[0] if num_out is None else num_out
    params = [t for t in (x, w_gate_EFD, w_up_EFD, w_down_EDF, weight_A) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in params):
        return _FusedExperts.apply(
            x,
            w_gate_EFD,
            w_up_EFD,
            w_down_EDF,
            weight_A,
            rows_A,
            counts,
            num_out,
            split,
            step_buffers,
        )
    ex = _Experts(x, w_gate_EFD, w_up_EFD, w_down_EDF, weight_A, rows_A, counts)
    out, _ = _forward_loop(ex, num_out, False, split, None)
    return out
