"""Experts side by side on threads against the plain loop: where `auto_split` should split.

Shapes: T tokens, D model dim, F expert hidden dim, E experts, N rows per expert (top-2,
so T = N * E / 2).

One case = the fused CPU experts (moekit/fused_experts.py) forward and backward over
random tokens, every expert given N rows, once with the experts in row-balanced groups on
single-threaded workers (`split=True`) and once as the plain loop whose every op uses all
intra-op threads (`split=False`), interleaved rounds, fp32. The ratio split / loop below
1 means splitting pays; the last column is what `auto_split` chooses for the shape, so
a row where the choice and the measurement disagree is a rule to revisit.

    python benchmarks/bench_split.py              # the shapes the rule was drawn from
    python benchmarks/bench_split.py --quick      # three small shapes, few rounds
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import (
    emit_json,
    fill_defaults,
    fmt_ms,
    machine,
    median,
    positive_int,
    print_table,
    set_threads,
    time_interleaved,
)

from moekit.expert_threads import auto_split, expert_groups
from moekit.fused_experts import fused_experts

SHAPES = [
    # (D, F, E, N): narrow experts (the tiny and small presets at large batches)
    (128, 128, 8, 4096),
    (128, 128, 64, 512),
    (256, 256, 16, 2048),
    (256, 256, 32, 512),
    # mid-sized experts, 16 of them
    (512, 512, 16, 1024),
    (1024, 704, 16, 1024),
    # mid-sized experts, 32-64 of them (the fine regime of bench_layer.py: 1024 x 704 x 64)
    (512, 512, 32, 512),
    (768, 512, 32, 1024),
    (1024, 704, 64, 512),
]
QUICK_SHAPES = [(128, 128, 8, 1024), (512, 512, 32, 256), (256, 256, 16, 512)]


def make_case(D: int, Fh: int, E: int, N: int, split: bool):
    """A closure running forward + backward of the fused experts on one shape."""
    gen = torch.Generator().manual_seed(0)
    T = N * E // 2
    x = torch.randn(T, D, generator=gen).requires_grad_()
    w_gate, w_up = (
        (torch.randn(E, Fh, D, generator=gen) * D**-0.5).requires_grad_() for _ in range(2)
    )
    w_down = (torch.randn(E, D, Fh, generator=gen) * Fh**-0.5).requires_grad_()
    # Each token twice (top-2), in random order: rows as the router would group them.
    rows_A = torch.arange(T).repeat(2)[torch.randperm(2 * T, generator=gen)]
    weight_A = torch.rand(2 * T, generator=gen).requires_grad_()
    leaves = (x, w_gate, w_up, w_down, weight_A)

    def run() -> None:
        out = fused_experts(x, w_gate, w_up, w_down, [N] * E, rows_A, weight_A, split=split)
        out.sum().backward()
        for t in leaves:
            t.grad = None

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=positive_int, help="timed rounds (default 7, quick 3)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--quick", action="store_true", help="three small shapes, 3 rounds")
    args = p.parse_args()
    # The split runs at least two workers whatever the thread count: on one thread it
    # would be two threads against the loop's one.
    if args.threads < 2:
        p.error(f"--threads must be >= 2 (the split runs a worker per thread), got {args.threads}")
    fill_defaults(args, rounds=(7, 3))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = args.rounds
    threads = set_threads(args.threads)
    started = time.perf_counter()
    rows, results = [], []
    for D, Fh, E, N in shapes:
        cases = {"split": make_case(D, Fh, E, N, True), "loop": make_case(D, Fh, E, N, False)}
        wall, _ = time_interleaved(cases, repeats=rounds)
        t_split, t_loop = median(wall["split"]), median(wall["loop"])
        chosen = auto_split([N] * E, list(range(E)), threads, D, Fh)
        workers = len(expert_groups([N] * E, True, D, Fh))
        if workers != threads:
            raise RuntimeError(f"the split ran {workers} workers on {threads} threads")
        rows.append(
            [f"{D} x {Fh}", E, N, fmt_ms(t_split), fmt_ms(t_loop), f"{t_split / t_loop:.2f}",
             "split" if chosen else "loop"]
        )  # fmt: skip
        results.append(
            {"D": D, "F": Fh, "E": E, "N": N, "split_s": t_split, "loop_s": t_loop,
             "ratio_split_over_loop": t_split / t_loop, "auto_split": chosen}
        )  # fmt: skip
    print(
        f"fused experts forward+backward, split (experts on {threads} single-threaded "
        f"workers) against the loop, fp32, median of {rounds} interleaved rounds"
    )
    print(f"machine: {machine()}")
    print_table(["D x F", "E", "rows/expert", "split ms", "loop ms", "split/loop", "auto"], rows)
    print(f"runtime {time.perf_counter() - started:.1f} s")
    emit_json({"benchmark": "split", "threads": threads, "rounds": rounds, "quick": args.quick,
               "shapes": results, "machine": machine()})  # fmt: skip


if __name__ == "__main__":
    main()
