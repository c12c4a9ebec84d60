"""All-to-all expert-parallel dispatch against local dispatch, on 2 gloo processes (CPU).

Shapes: T tokens per rank, D model dim, F expert hidden dim, E experts, K top-k, W ranks.

Both variants run in the same two processes, one torch thread each, on the same tokens:
- local: every rank holds all E experts and runs its own T tokens through them
  (the grouped path; no communication) -- the baseline;
- all-to-all: every rank holds E/W experts; tokens travel to their expert's rank and
  back (count exchange + two variable-split all-to-alls per call, and two more in
  backward), and the routing statistics are all-reduced over the group (about ten
  small all-reduces per forward, two in backward), which the local baseline, computing
  its own tokens' statistics, never needs: the ratio is the whole cost of sharding.
Reported: median over repeats of the slowest rank's time for forward and for
forward+backward, and the ratio all-to-all / local. Float32. A human table, then one
JSON line. Gloo on loopback only: NCCL is not measured here.

    .venv/bin/python benchmarks/bench_parallel.py [--tokens 256 1024 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.distributed as dist
from _common import positive_int

from moekit import MoE, MoEConfig
from moekit.parallel import apply_expert_parallel
from moekit.parallel.pool import WorkerPool

WORLD = 2


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _call(moe: MoE, x: torch.Tensor, backward: bool) -> float:
    dist.barrier()
    start = time.perf_counter()
    y, out = moe(x)
    if backward:
        (y.square().mean() + out.loss).backward()
    elapsed = _slowest(time.perf_counter() - start)
    moe.zero_grad(set_to_none=True)
    return elapsed


def _time_pair(models: dict[str, MoE], x: torch.Tensor, backward: bool, repeats: int) -> dict:
    # Variants alternate call by call, so load from other processes on the machine
    # lands on both alike rather than on whichever ran second; odd rounds reverse the
    # order, so neither always follows the other (see _common.time_interleaved).
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    for i in range(repeats + 2):  # two warm-up rounds
        for name, moe in order if i % 2 == 0 else order[::-1]:
            elapsed = _call(moe, x, backward)
            if i >= 2:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_worker(rank: int, world_size: int, shapes: dict, tokens: list[int], repeats: int):
    cfg = MoEConfig(**shapes)
    rows = []
    for T in tokens:
        torch.manual_seed(0)
        local = MoE(cfg)
        same = MoE(cfg)
        same.load_state_dict(local.state_dict())  # the same weights: the same routing
        sharded = apply_expert_parallel(same)
        gen = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(T, cfg.d_model, generator=gen).requires_grad_(True)
        row = {"tokens_per_rank": T}
        models = {"local": local, "all_to_all": sharded}
        for suffix, backward in (("fwd", False), ("fwd_bwd", True)):
            for name, seconds in _time_pair(models, x, backward, repeats).items():
                row[f"{name}_{suffix}_ms"] = 1e3 * seconds
        rows.append(row)
    return rows


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads visible, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--d-model", type=positive_int, default=256)
    p.add_argument("--d-ff", type=positive_int, default=512)
    p.add_argument("--experts", type=positive_int, default=8)
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=7)
    args = p.parse_args()
    shapes = dict(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=args.top_k)
    # Checked here, not as a traceback from inside a worker process.
    try:
        MoEConfig(**shapes)
    except ValueError as err:
        p.error(str(err))
    if args.experts % WORLD:
        p.error(f"--experts must be a multiple of the {WORLD} ranks, got {args.experts}")
    with WorkerPool(WORLD, collective_timeout_s=120) as pool:
        rows = pool.run(bench_worker, shapes, args.tokens, args.repeats, timeout_s=1200)[0]
    for row in rows:
        row["fwd_ratio"] = row["all_to_all_fwd_ms"] / row["local_fwd_ms"]
        row["fwd_bwd_ratio"] = row["all_to_all_fwd_bwd_ms"] / row["local_fwd_bwd_ms"]

    print(f"machine: {_machine()}")
    print(
        f"{WORLD} gloo processes on loopback, 1 thread each; float32; D={args.d_model} "
        f"F={args.d_ff} E={args.experts} K={args.top_k} (SwiGLU); median of {args.repeats}, "
        "slowest rank"
    )
    print("gloo only: NCCL is not measured by this script")
    head = f"{'T/rank':>7} | {'local fwd':>10} {'a2a fwd':>10} {'ratio':>6} | "
    head += f"{'local f+b':>10} {'a2a f+b':>10} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['tokens_per_rank']:>7} | {r['local_fwd_ms']:>8.2f}ms "
            f"{r['all_to_all_fwd_ms']:>8.2f}ms {r['fwd_ratio']:>6.2f} | "
            f"{r['local_fwd_bwd_ms']:>8.2f}ms "
            f"{r['all_to_all_fwd_bwd_ms']:>8.2f}ms {r['fwd_bwd_ratio']:>6.2f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "bench_parallel",
                "backend": "gloo",
                "world_size": WORLD,
                "dtype": "float32",
                "shapes": shapes,
                "repeats": args.repeats,
                "machine": _machine(),
                "nccl": None,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
