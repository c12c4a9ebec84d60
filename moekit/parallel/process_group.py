"""Start torch.distributed from the environment torchrun sets, with bounded waits.

Rendezvous defaults to loopback (MASTER_ADDR=127.0.0.1). Two separate timeouts: how long
to wait for every rank to join (init), and how long any collective may block once
running; a rank that dies therefore turns into an error on the others in bounded time
instead of a hang. Nothing here runs at import.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moekit.validate import check_range


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits, as read from torchrun's environment variables."""

    rank: int
    """Global rank (RANK)."""
    world_size: int
    """Number of processes (WORLD_SIZE)."""
    local_rank: int
    """Rank on this machine (LOCAL_RANK); picks the CUDA device."""
    local_world_size: int
    """Processes on this machine (LOCAL_WORLD_SIZE): they share its RAM. Unset, all of them,
    as an unset LOCAL_RANK is RANK."""
    master_addr: str
    """Rendezvous host (MASTER_ADDR), loopback by default."""
    master_port: int
    """Rendezvous port (MASTER_PORT)."""
    agent_store: bool
    """True when torchrun's agent already serves the store: every rank joins as a client."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, {self.world_size}), got {self.rank}")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(
                f"LOCAL_WORLD_SIZE must be in [1, {self.world_size}], got {self.local_world_size}"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"LOCAL_RANK must be in [0, {self.local_world_size}), got {self.local_rank}"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port, got {self.master_port}")


def read_env(environ: dict[str, str] | None = None) -> DistributedEnv | None:
    """The torchrun variables, or None when this process was not started as one of several."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None

    def as_int(name: str, default: str | None = None) -> int:
        value = env.get(name, default)
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None

    return DistributedEnv(
        rank=as_int("RANK"),
        world_size=as_int("WORLD_SIZE"),
        local_rank=as_int("LOCAL_RANK", env.get("RANK")),
        local_world_size=as_int("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE")),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=as_int("MASTER_PORT", "29500"),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
    )


def default_backend() -> str:
    """nccl when CUDA is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


MAX_TIMEOUT_S = 1e9
"""The longest timeout taken, in seconds (about 31 years): torch turns a timeout into a
timedelta and then whole milliseconds, which infinity and far larger numbers overflow."""


def check_timeout(name: str, value: object) -> None:
    """TypeError / ValueError naming `name` unless value is a number of seconds in
    (0, MAX_TIMEOUT_S]."""
    check_range(name, value, 0, MAX_TIMEOUT_S, low_open=True)


def init_distributed(
    backend: str | None = None,
    *,
    init_timeout_s: float = 120.0,
    timeout_s: float = 300.0,
    env: DistributedEnv | None = None,
) -> DistributedEnv:
    """Join the process group described by the environment (torchrun / moekit.parallel.spawn).

    Args:
        backend: "gloo", "nccl" or None (nccl with CUDA, else gloo).
        init_timeout_s: how long to wait for all ranks to reach the rendezvous.
        timeout_s: how long any collective may block before it fails.
        env: explicit placement; None reads the environment.

    Returns:
        The placement used. Raises RuntimeError if the environment names no group.
    """
    check_timeout("init_timeout_s", init_timeout_s)
    check_timeout("timeout_s", timeout_s)
    env = env if env is not None else read_env()
    if env is None:
        raise RuntimeError(
            "no distributed environment: start with torchrun (RANK/WORLD_SIZE unset)"
        )
    if dist.is_initialized():
        return env
    backend = backend or default_backend()
    if backend == "nccl":
        # One GPU per process: a rank beyond the last device would fail later with an
        # opaque "invalid device ordinal" from inside the first collective.
        num_gpus = torch.cuda.device_count()
        if env.local_rank >= num_gpus:
            raise ValueError(
                f"local rank {env.local_rank} has no CUDA device: this machine has {num_gpus}; "
                f"start at most {num_gpus} processes per node, or use the gloo backend on CPU"
            )
        torch.cuda.set_device(env.local_rank)
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=env.rank == 0 and not env.agent_store,
        timeout=datetime.timedelta(seconds=init_timeout_s),
        wait_for_workers=False,
    )
    _wait_for_every_rank(store, env, init_timeout_s)
    dist.init_process_group(
        backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        # Named, NCCL binds each rank's communicator to its own GPU; unnamed it guesses
        # the device from the global rank, which can hang where ranks map to GPUs
        # differently (and says so on every start).
        device_id=torch.device("cuda", env.local_rank) if backend == "nccl" else None,
    )
    # Every rank has joined; one barrier confirms that all got through the group's set-up
    # before the first real collective.
    dist.barrier()
    return env


def _wait_for_every_rank(store: dist.Store, env: DistributedEnv, timeout_s: float) -> None:
    """Each rank marks itself in the store, then waits at most timeout_s for the others.

    init_process_group waits for its peers as long as a collective may (timeout_s of the
    group), and where the store already exists (rank 0 serves it; under torchrun the agent
    serves it to every rank) nothing shorter bounds the join: a process that never starts
    would hold the others for the collective timeout, then fail with a store traceback.
    """
    # Keys per restart: torchrun's agent keeps its store across the restarts of a job.
    prefix = f"moekit/join/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}{rank}" for rank in range(env.world_size)]
    store.set(keys[env.rank], "1")
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
    except RuntimeError as err:  # torch's DistStoreError: the wait timed out
        missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
        raise TimeoutError(
            f"rank(s) {missing} of {env.world_size} did not join within the init timeout "
            f"({timeout_s:g} s, --dist-init-timeout)"
        ) from err


def close_distributed() -> None:
    """Leave the process group if one is open."""
    if dist.is_initialized():
        dist.destroy_process_group()
