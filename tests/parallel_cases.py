"""Worker functions and cases for the multi-process tests (run under moekit.parallel.spawn).

Shapes: B batch, S sequence, D model dim, E experts, W ranks.

Module-level so spawned interpreters can import them by name. Each case builds the same
full MoE layer and global batch on every process from a seed; a rank takes batch rows
[rank*B/W, (rank+1)*B/W), the way the data pipeline shards a global batch.
"""

from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.parallel.pool import WorkerPool

_POOLS: dict[int, WorkerPool] = {}


def pool(world_size: int) -> WorkerPool:
    """A standing gloo world of this size, shared by the tests (started once per session)."""
    found = _POOLS.get(world_size)
    if found is None or not found.alive:
        found = _POOLS[world_size] = WorkerPool(world_size, collective_timeout_s=60)
    return found


@atexit.register
def _close_pools() -> None:
    for p in _POOLS.values():
        p.close()


@dataclass(frozen=True)
class LayerCase:
    """One expert-parallel equivalence check: a layer, a batch shape, some forcing."""

    name: str
    config: dict
    dtype: torch.dtype = torch.float32
    batch: int = 4
    seq: int = 5
    empty_last_rank: bool = False
    """The last rank's rows are all padding: it sends zero tokens."""
    random_padding: bool = True
    dead_expert: int | None = None
    """Push this expert's router logit far down: it receives no tokens."""
    hot_expert: int | None = None
    """Push this expert's logit far up: with top_k=1 it receives every token."""
    bias: list[float] = field(default_factory=list)
    """expert_bias for the sigmoid_bias router."""
    flat: bool = False
    """Feed [T, D] rows (one sequence per call; over the ranks, one sequence in all)."""
    grouped_mm: bool = False
    """Run the all-to-all path's grouped-GEMM branch (CUDA's) on CPU, where torch has
    F.grouped_mm forward and backward for float32 but the layer never picks it."""


def build_case(case: LayerCase, world_size: int):
    """The full layer, global input x [B, S, D], padding mask [B, S] and output weights g."""
    cfg = MoEConfig(**case.config)
    torch.manual_seed(1234)
    moe = MoE(cfg).to(case.dtype)
    gen = torch.Generator().manual_seed(99)
    B, S, D = case.batch, case.seq, cfg.d_model
    x = torch.randn(B, S, D, generator=gen, dtype=case.dtype)
    g = torch.randn(B, S, D, generator=gen, dtype=case.dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    if case.random_padding:
        mask = torch.rand(B, S, generator=gen) < 0.25
    if case.empty_last_rank:
        mask[B - B // world_size :] = True
    with torch.no_grad():
        if case.dead_expert is not None or case.hot_expert is not None:
            # Feature 0 is made large and positive, so a router row's weight on it decides.
            x[..., 0] = 3.0 + x[..., 0].abs()
        if case.dead_expert is not None:
            moe.router.weight[case.dead_expert, 0] = -20.0
        if case.hot_expert is not None:
            moe.router.weight[case.hot_expert, 0] = 20.0
        if case.bias:
            moe.router.expert_bias.copy_(torch.tensor(case.bias))
    return moe, x, mask, g


def rank_rows(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    b = t.shape[0] // world_size
    return t[rank * b : (rank + 1) * b]


def layer_worker(rank: int, world_size: int, cases: list[LayerCase]) -> list[dict]:
    """Run every case expert-parallel; return this rank's outputs and gradients."""
    import moekit.experts as experts_module

    supported = experts_module._grouped_mm_supported
    results = []
    for case in cases:
        calls = []
        if case.grouped_mm:
            # Record each time the all-to-all path asks, so the test knows the branch ran.
            experts_module._grouped_mm_supported = lambda x, calls=calls: calls.append(1) or True
        try:
            results.append(_layer_case(rank, world_size, case))
        finally:
            # The pool's processes outlive this task: later ones must see the library as is.
            experts_module._grouped_mm_supported = supported
        results[-1]["grouped_mm_calls"] = len(calls)
    return results


def _layer_case(rank: int, world_size: int, case: LayerCase) -> dict:
    from moekit.parallel import apply_expert_parallel

    moe, x, mask, g = build_case(case, world_size)
    apply_expert_parallel(moe)
    x_local, mask_local = rank_rows(x, rank, world_size), rank_rows(mask, rank, world_size)
    if case.flat:
        x_local, mask_local = x_local.flatten(0, 1), mask_local.flatten()
    x_local = x_local.clone().requires_grad_(True)
    y, out = moe(x_local, padding_mask=mask_local)
    loss = (y * rank_rows(g, rank, world_size).view_as(y)).sum() + out.loss
    loss.backward()
    return _result(y.detach(), x_local.grad, _stats(out), moe)


def _result(y, x_grad, stats: dict, moe) -> dict:
    """What a rank or a reference returns for comparison: outputs, input gradient, the
    routing statistics and every parameter's gradient."""
    return {
        "y": y,
        "x_grad": x_grad,
        "stats": stats,
        "grads": {n: p.grad for n, p in moe.named_parameters()},
    }


def _stats(out) -> dict:
    return {
        "loss": out.loss.detach(),
        "aux_loss": out.aux_loss.detach(),
        "seq_aux_loss": out.seq_aux_loss.detach(),
        "z_loss": out.z_loss.detach(),
        "tokens_per_expert": out.tokens_per_expert,
        "routed_tokens_per_expert": out.routed_tokens_per_expert,
        "dropped_fraction": out.dropped_fraction,
        "router_entropy": out.router_entropy,
    }


def single_process_reference(case: LayerCase, world_size: int) -> dict:
    """The same layer on one process, fed the whole batch, differentiating the sum of the
    W ranks' losses: sum(y * g) + W * out.loss (each rank adds the group-wide loss once).
    """
    moe, x, mask, g = build_case(case, world_size)
    if case.flat:
        x, mask, g = x.flatten(0, 1), mask.flatten(), g.flatten(0, 1)
    x = x.clone().requires_grad_(True)
    y, out = moe(x, padding_mask=mask)
    loss = (y * g).sum() + world_size * out.loss
    loss.backward()
    return _result(y.detach(), x.grad, _stats(out), moe)


def per_rank_reference(case: LayerCase, world_size: int) -> dict:
    """The reference where routing decides over each rank's own tokens: capacity and the
    expert_choice router (apply_expert_parallel's docstring, as GShard's groups).

    One process runs the layer on each rank's rows alone, for the outputs and the
    assignment counts (the dropped fraction is the group's: kept over routed, both summed
    over the ranks), and on the whole batch for the losses, whose statistics are summed
    over the group. Token choice: they count the assignments before capacity drops, which
    depend on each token alone, so they are the whole batch's. Expert choice fills every
    expert exactly, so the Switch loss is 1 whatever the choice; the z-loss and entropy are
    per token; the sequence loss is the mean over the sequences with real tokens, each on
    one rank, so the ranks' own losses weighted by those sequences (the case keeps it out
    of the loss: seq_aux_loss_coef=0). Differentiates sum(y * g) + W * out.loss, as
    single_process_reference.
    """
    expert_choice = case.config.get("router") == "expert_choice"
    if expert_choice and (case.flat or case.config.get("seq_aux_loss_coef", 0.0)):
        raise ValueError(f"{case.name}: this reference needs [B, S, D] rows, no seq_aux_loss")
    moe, x, mask, g = build_case(case, world_size)
    x = x.clone().requires_grad_(True)
    outs, ys, seqs = [], [], []
    for rank in range(world_size):
        x_r, mask_r, g_r = (rank_rows(t, rank, world_size) for t in (x, mask, g))
        seqs.append((~mask_r).any(dim=1).sum())
        if case.flat:
            x_r, mask_r, g_r = x_r.flatten(0, 1), mask_r.flatten(), g_r.flatten(0, 1)
        y_r, out_r = moe(x_r, padding_mask=mask_r)
        (y_r * g_r).sum().backward()  # accumulates into x.grad and the weights' grads
        ys.append(y_r.detach())
        outs.append(out_r)
    x_all, mask_all = (x.flatten(0, 1), mask.flatten()) if case.flat else (x, mask)
    _, whole = moe(x_all, padding_mask=mask_all)
    (world_size * whole.loss).backward()
    stats = _stats(whole)
    kept = sum(o.tokens_per_expert for o in outs)
    routed = sum(o.routed_tokens_per_expert for o in outs)
    stats["tokens_per_expert"], stats["routed_tokens_per_expert"] = kept, routed
    stats["dropped_fraction"] = 1 - kept.sum() / routed.sum()
    if expert_choice:
        seq_losses = torch.stack([o.seq_aux_loss.detach() for o in outs])
        weights = torch.stack(seqs).to(seq_losses.dtype)
        stats["seq_aux_loss"] = (seq_losses * weights).sum() / weights.sum()
    return _result(torch.cat(ys), x.grad.flatten(0, 1) if case.flat else x.grad, stats, moe)


def _derivatives(moe, x, mask, g, v, loss_scale: float) -> dict:
    """What the higher-order checks compare: the gradient of a gradient penalty
    ((dL/dx)^2 summed, L = sum(y * g) + loss_scale * out.loss, its backward with
    create_graph), the forward-mode tangent of y along v, and torch.func.grad of L."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call, grad

    result: dict = {}
    if moe.config.impl == "reference":
        x1 = x.clone().requires_grad_(True)
        y, out = moe(x1, padding_mask=mask)
        loss = (y * g).sum() + loss_scale * out.loss
        (gx,) = torch.autograd.grad(loss, x1, create_graph=True)
        gx.square().sum().backward()
        result["penalty_x_grad"] = x1.grad
        result["penalty_grads"] = {n: p.grad for n, p in moe.named_parameters()}
        moe.zero_grad(set_to_none=True)
    with torch.no_grad(), fwAD.dual_level():
        y, _ = moe(fwAD.make_dual(x, v), padding_mask=mask)
        result["tangent"] = fwAD.unpack_dual(y).tangent
    params = dict(moe.named_parameters())

    def objective(x_in):
        y, out = functional_call(moe, params, (x_in,), {"padding_mask": mask})
        return (y * g).sum() + loss_scale * out.loss

    result["func_grad"] = grad(objective)(x)
    return result


def derivatives_worker(rank: int, world_size: int, cases: list[LayerCase]) -> list[dict]:
    """Each case expert-parallel: this rank's rows of `_derivatives`."""
    from moekit.parallel import apply_expert_parallel

    results = []
    for case in cases:
        moe, x, mask, g = build_case(case, world_size)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
        apply_expert_parallel(moe)
        rows = [rank_rows(t, rank, world_size) for t in (x, mask, g, v)]
        results.append(_derivatives(moe, *rows, loss_scale=1.0))
    return results


def derivatives_single_process(case: LayerCase, world_size: int) -> dict:
    """`_derivatives` of the whole layer on the whole batch, with the W ranks' losses."""
    moe, x, mask, g = build_case(case, world_size)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    return _derivatives(moe, x, mask, g, v, loss_scale=float(world_size))


def dead_rank_worker(rank: int, world_size: int, die_rank: int) -> dict:
    """An expert-parallel step in which `die_rank` exits before its all-to-all."""
    from moekit.parallel import apply_expert_parallel

    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=world_size * 2, top_k=2)
    torch.manual_seed(0)
    moe = apply_expert_parallel(MoE(cfg))
    x = torch.randn(6, cfg.d_model)
    moe(x)  # one healthy step
    dist.barrier()
    if rank == die_rank:
        os._exit(3)
    start = time.monotonic()
    try:
        for _ in range(1000):
            moe(x)[0].sum().backward()
    except Exception as err:  # what a surviving rank sees
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def errors_worker(rank: int, world_size: int) -> dict:
    """The messages of the misuses apply_expert_parallel and ParallelContext refuse."""
    from torch import nn

    from moekit.parallel import apply_expert_parallel
    from moekit.parallel.context import ParallelContext

    def message(fn) -> str:
        try:
            fn()
        except (ValueError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    odd = MoEConfig(d_model=8, d_ff=8, num_experts=world_size + 1, top_k=1)
    twice = apply_expert_parallel(MoE(odd.replace(num_experts=world_size)))
    return {
        "indivisible": message(lambda: apply_expert_parallel(MoE(odd))),
        "twice": message(lambda: apply_expert_parallel(twice)),
        "no_moe": message(lambda: apply_expert_parallel(nn.Linear(2, 2))),
        "bad_ep": message(lambda: ParallelContext(expert_parallel=world_size + 1)),
        "group_name": message(lambda: apply_expert_parallel(MoE(odd), group="world")),
        "stats_group": message(lambda: apply_expert_parallel(MoE(odd), stats_group=2)),
        "not_module": message(lambda: apply_expert_parallel(torch.zeros(3))),
        "inf_timeout": message(lambda: ParallelContext(timeout_s=float("inf"))),
        "str_timeout": message(lambda: ParallelContext(timeout_s="10")),
    }


def hung_rank_worker(rank: int, world_size: int, timeout_s: float, expert_parallel: int) -> dict:
    """Rank 1 stalls (alive, silent) mid-step past the collective timeout of a
    ParallelContext: the layer's collectives run on the context's own groups (the experts'
    all-to-all, the balancing statistics under data parallelism), which must keep it."""
    from moekit.parallel import ParallelContext

    ctx = ParallelContext(expert_parallel=expert_parallel, timeout_s=timeout_s)
    cfg = MoEConfig(d_model=8, d_ff=12, num_experts=2 * world_size, top_k=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    ctx.prepare(moe)  # shards moe in place; called directly, without the DDP wrapper
    x = torch.randn(6, cfg.d_model)
    moe(x)  # one healthy step
    if rank == 1:
        time.sleep(timeout_s + 2.0)
        return {"error": None, "seconds": 0.0}
    start = time.monotonic()
    try:
        moe(x)
    except Exception as err:  # what the waiting rank sees
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}
