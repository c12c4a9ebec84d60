"""Expert-level threading on CPU: which experts run side by side, and running them.

Shapes: D model dim, F expert hidden dim; counts[e] rows of expert e.

Where there are many experts with mid-sized matmuls (64 experts of ~512 rows x 1024 x
704), the experts are split into row-balanced groups run side by side, one
single-threaded worker per intra-op thread: such matmuls share two threads poorly, and
each of the loop's many small multi-threaded ops can stall on the other thread. Each
group sums into its own output (and dx) buffer and the buffers are added in group order,
so results do not depend on thread timing. `auto_split` says which shapes split and what
was measured.
"""

from __future__ import annotations

import threading

import torch


def expert_groups(counts: list[int], split: bool | None, D: int, Fh: int) -> list[list[int]]:
    """Experts to run side by side: contiguous runs of experts with about equal rows.

    One group (the plain loop, each op using every intra-op thread) unless `split` asks
    for a split or, when None, the shapes call for one; see `auto_split`.
    """
    busy = [e for e, n in enumerate(counts) if n]
    threads = torch.get_num_threads()
    if split is None:
        split = auto_split(counts, busy, threads, D, Fh)
    num_groups = min(max(threads, 2), len(busy)) if split else 1
    if num_groups <= 1:
        return [busy]
    total, groups, done = sum(counts), [[] for _ in range(num_groups)], 0
    for e in busy:
        # An expert joins the group its middle row falls in: groups balanced by rows.
        groups[(2 * done + counts[e]) * num_groups // (2 * total)].append(e)
        done += counts[e]
    return [g for g in groups if g]


def auto_split(counts: list[int], busy: list[int], threads: int, D: int, Fh: int) -> bool:
    # Measured on 2 cores, fp32, forward+backward of the fused experts, split against the
    # plain loop (every expert's rows equal; benchmarks/README.md has the table). The
    # split pays where there are many experts with wide weights: 32-64 experts of
    # D*F >= 2^18 ran 0.91-0.97x the loop's time (the fine regime, 64 x ~512 rows x
    # 1024 x 704: 0.97x), as each of the loop's thousands of small multi-threaded ops can
    # stall on the other thread. It does not pay with fewer experts (16 experts of
    # 512 x 512 to 1024 x 704: 1.00-1.10x; coarse, 8 x 1024 x 2816: 1.2x) nor with narrow
    # ones, whatever their rows (128 x 128 and 256 x 256: 1.04-1.26x; the tiny preset
    # trained 14% slower at batch 64 x 256 when it split), where Python overhead
    # serialised by the GIL, per-worker buffers and memory bandwidth dominate; nor for a
    # few rows per expert (decoding: 1.06x).
    if threads < 2 or len(busy) < max(2 * threads, SPLIT_MIN_EXPERTS):
        return False
    if D * Fh < SPLIT_MIN_WEIGHT:
        return False
    macs = sum(counts) // len(busy) * D * Fh
    return SPLIT_MACS[0] <= macs <= SPLIT_MACS[1]


SPLIT_MIN_EXPERTS = 32
"""Busy experts below which the experts never run on separate threads."""

SPLIT_MIN_WEIGHT = 2**18
"""Elements of one expert projection (D x F) below which experts never run side by side."""

SPLIT_MACS = (2**26, 2**30)
"""Mean multiply-adds of one busy expert's matmul (rows x D x F) within which experts run
on separate threads."""


def side_by_side(tasks: list) -> list:
    """Run the callables concurrently, each on its own thread with one intra-op thread.

    torch ops release the GIL, so the threads overlap in the matmuls. The caller's
    grad mode and inference mode hold in every thread and its thread count is restored
    afterwards; results come back in task order.
    """
    threads = torch.get_num_threads()
    results: list = [None] * len(tasks)
    errors: list[BaseException] = []

    # Both thread-local. Grad mode is off inside autograd Functions; under inference mode
    # the caller's buffers are inference tensors, which only inference mode may update.
    grad_enabled = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()

    def run(i: int) -> None:
        try:
            torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled):
                results[i] = tasks[i]()
        except BaseException as err:  # re-raised on the calling thread
            errors.append(err)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(1, len(tasks))]
    try:
        for w in workers:
            w.start()
        run(0)
    finally:
        for w in workers:
            w.join()
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]
    return results
