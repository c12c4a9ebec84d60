"""A standing group of N local processes that runs function after function, time-limited.

Starting interpreters is most of the cost of a small multi-process check (each imports
torch), so tests and benchmarks that need many checks on the same world size start the
world once: `WorkerPool(4).run(fn, *args)` runs fn(rank, world_size, *args) on every rank
and returns the values in rank order. A task past its time limit, or a rank that dies,
kills the whole pool and raises: a hang fails instead of stalling.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _dumps(value: Any) -> bytes:
    # Through torch.save: tensors travel by value, no shared-memory handles that die with
    # the child.
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def join_env(rank: int, world_size: int, port: int, threads: int) -> None:
    """In a child: torchrun's variables for a store the parent serves on loopback."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        WORLD_SIZE=str(world_size),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(threads)


def _serve(rank, world_size, port, tasks, results, backend, timeout_s, threads):
    join_env(rank, world_size, port, threads)
    from moekit.parallel.process_group import close_distributed, init_distributed

    try:
        init_distributed(backend, init_timeout_s=timeout_s, timeout_s=timeout_s)
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                results.put((rank, _dumps(fn(rank, world_size, *args)), None))
            except BaseException:
                results.put((rank, None, traceback.format_exc()))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        close_distributed()


class WorkerPool:
    """world_size processes joined in a process group on loopback, kept for many tasks.

    Args:
        world_size: number of processes.
        backend: torch.distributed backend ("gloo" on CPU).
        collective_timeout_s: how long one collective may block inside a task.
        threads: torch threads per process (1: several processes share few cores).
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        collective_timeout_s: float = 60.0,
        threads: int = 1,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        ctx = mp.get_context("spawn")  # never fork a process whose thread pools are running
        # The parent serves the store on a port the OS picks: no fixed port, no race.
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size,
            is_master=True,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
            wait_for_workers=False,
        )
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(
                    r,
                    world_size,
                    self._store.port,
                    self._tasks[r],
                    self._results,
                    backend,
                    collective_timeout_s,
                    threads,
                ),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0) -> list[Any]:
        """fn(rank, world_size, *args) on every rank; the values in rank order.

        fn must be importable by name. Raises RuntimeError with every failing rank's
        traceback, or TimeoutError (after killing the pool) past timeout_s.
        """
        if not self.alive:
            raise RuntimeError("the worker pool is closed or lost a process")
        for q in self._tasks:
            q.put((fn, args))
        values: list[Any] = [None] * self.world_size
        errors: dict[int, str] = {}
        first_error = 0.0
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                if errors and time.monotonic() > first_error + 5.0:
                    # The other ranks are likely blocked in a collective with the failed
                    # one: report what failed rather than wait for their timeout.
                    raise RuntimeError(_failure(fn, errors, pending))
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{fn.__name__} on {self.world_size} processes did not finish within "
                        f"{timeout_s:g} s; ranks still running: {sorted(pending)}"
                    )
                try:
                    rank, payload, error = self._results.get(timeout=0.05)
                except queue.Empty:
                    dead = [r for r in pending if not self._procs[r].is_alive()]
                    if dead and self._results.empty():
                        raise RuntimeError(f"rank(s) {dead} died running {fn.__name__}") from None
                    continue
                pending.discard(rank)
                if error is not None:
                    first_error = first_error if errors else time.monotonic()
                    errors[rank] = error
                else:
                    values[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        except BaseException:
            self.kill()
            raise
        if errors:
            raise RuntimeError(_failure(fn, errors, pending))
        return values

    def kill(self) -> None:
        """Stop every process now."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join()

    def close(self, grace_s: float = 5.0) -> None:
        """Ask the processes to leave the group and exit; kill what is left after grace_s."""
        for q, p in zip(self._tasks, self._procs, strict=True):
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + grace_s
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _failure(fn: Callable[..., Any], errors: dict[int, str], pending: set[int]) -> str:
    text = "".join(f"--- rank {r}:\n{e}" for r, e in sorted(errors.items()))
    stuck = f" (ranks {sorted(pending)} did not finish)" if pending else ""
    return f"{fn.__name__} failed on {len(errors)} rank(s){stuck}:\n{text}"
