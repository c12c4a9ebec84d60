"""Run a function on N local processes joined in a process group, with a hard time limit.

For tests and benchmarks: `spawn(fn, world_size, *args)` starts fresh interpreters
("spawn", never fork: a forked copy of a process whose OpenMP pool is running can
deadlock), rendezvous on loopback through a store the parent serves on a port the OS
picks (no fixed port, no race for a free one), and returns each rank's result. A rank
that hangs past `timeout_s` gets every process killed and a TimeoutError raised, so a
deadlock fails instead of stalling.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moekit.parallel.pool import _dumps, join_env


@dataclass
class RankResult:
    """What one rank did: its return value, or the error it raised, or how it exited."""

    rank: int
    value: Any = None
    error: str | None = None
    exitcode: int | None = None
    reported: bool = False


def _worker(fn, rank, world_size, port, results, args, backend, timeout_s, threads):
    join_env(rank, world_size, port, threads)
    from moekit.parallel.process_group import close_distributed, init_distributed

    try:
        init_distributed(backend, init_timeout_s=timeout_s, timeout_s=timeout_s)
        value = fn(rank, world_size, *args)
        results.put((rank, _dumps(value), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        close_distributed()


def spawn_results(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    collective_timeout_s: float | None = None,
    backend: str = "gloo",
    threads: int = 1,
) -> list[RankResult]:
    """Run fn(rank, world_size, *args) on world_size processes; one RankResult per rank.

    fn must be importable by name (module level). Ranks that exit without reporting
    (a crash, os._exit) get reported=False and their exit code. Raises TimeoutError,
    after killing every process, if they are not all done within timeout_s.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    results = ctx.Queue()
    limit = collective_timeout_s if collective_timeout_s is not None else timeout_s
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, store.port, results, args, backend, limit, threads),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out = [RankResult(rank=r) for r in range(world_size)]
    deadline = time.monotonic() + timeout_s
    try:
        pending = set(range(world_size))
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} processes did not finish within "
                    f"{timeout_s:g} s; ranks still running: {sorted(pending)}"
                )
            try:
                rank, payload, error = results.get(timeout=0.05)
            except queue.Empty:
                for r in list(pending):
                    if not procs[r].is_alive() and procs[r].exitcode is not None:
                        # Give a message in flight a moment to arrive before giving up on it.
                        time.sleep(0.2)
                        if results.empty():
                            pending.discard(r)
                            break
                continue
            out[rank].reported = True
            out[rank].error = error
            if payload is not None:
                out[rank].value = torch.load(io.BytesIO(payload), weights_only=False)
            pending.discard(rank)
        # Every rank has reported: leaving the group is all that is left. After a peer
        # died that can block until the collective timeout, so it gets a short grace only.
        grace = time.monotonic() + 5.0
        for p in procs:
            p.join(timeout=max(0.1, min(deadline, grace) - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        del store  # served the rendezvous until every rank was done
    for r, p in enumerate(procs):
        out[r].exitcode = p.exitcode
    return out


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any) -> list[Any]:
    """Like spawn_results, but returns the values and raises if any rank failed."""
    results = spawn_results(fn, world_size, *args, **kwargs)
    failed = [r for r in results if r.error is not None or not r.reported]
    if failed:
        lines = []
        for r in failed:
            what = r.error if r.error is not None else f"exited with code {r.exitcode}\n"
            lines.append(f"--- rank {r.rank}: {what}")
        raise RuntimeError(f"{fn.__name__} failed on {len(failed)} rank(s):\n" + "".join(lines))
    return [r.value for r in results]
