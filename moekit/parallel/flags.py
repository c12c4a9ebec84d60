"""Command-line flags for running under torchrun, and the ParallelContext they describe.

    torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2 --preset tiny

Imports nothing heavy at module level: the CLI builds every parser at start-up.
"""

from __future__ import annotations

import argparse
import os


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--expert-parallel, --dist-backend, --dist-init-timeout and --dist-timeout."""
    g = p.add_argument_group("several processes (start with torchrun)")
    g.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="N",
        help="shard the experts over groups of N processes; the non-expert weights are "
        "data-parallel over all of them (default under torchrun: 1, data parallel only)",
    )
    g.add_argument(
        "--dist-backend",
        choices=("auto", "gloo", "nccl"),
        default="auto",
        help="torch.distributed backend: nccl with CUDA, gloo otherwise (default: auto)",
    )
    g.add_argument(
        "--dist-init-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for every process to join (default: 120)",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long a collective may wait; a dead process fails the others by then "
        "(default: 300)",
    )


def context_from_args(args: argparse.Namespace):
    """A ParallelContext when started by torchrun (or asked for one), else None.

    Raises ValueError for --expert-parallel without a multi-process launch.
    """
    from moekit.parallel.process_group import check_timeout

    # Checked with or without torchrun: a command line that works alone must not fail
    # only once launched on several processes.
    check_timeout("--dist-init-timeout", args.dist_init_timeout)
    check_timeout("--dist-timeout", args.dist_timeout)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    ep = args.expert_parallel
    if ep is not None and (not isinstance(ep, int) or ep < 1):
        raise ValueError(f"--expert-parallel must be a positive int, got {ep!r}")
    if not launched:
        if ep is not None and ep > 1:
            raise ValueError(
                f"--expert-parallel {ep} needs {ep} processes: start with "
                f"torchrun --nproc-per-node {ep} -m moekit train ..."
            )
        return None
    from moekit.parallel.context import ParallelContext

    return ParallelContext(
        expert_parallel=ep if ep is not None else 1,
        backend=None if args.dist_backend == "auto" else args.dist_backend,
        init_timeout_s=args.dist_init_timeout,
        timeout_s=args.dist_timeout,
    )
