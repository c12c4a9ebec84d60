"""A rank that dies or stalls mid-step turns into an error on the others in bounded time."""

from __future__ import annotations

import socket
import time

import pytest
from parallel_cases import dead_rank_worker, hung_rank_worker, pool

from moekit.parallel.process_group import DistributedEnv, init_distributed
from moekit.parallel.spawn import spawn_results

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(90)]

COLLECTIVE_TIMEOUT_S = 15.0


def test_dead_rank_fails_the_others_in_bounded_time() -> None:
    results = spawn_results(
        dead_rank_worker, 2, 1, timeout_s=60, collective_timeout_s=COLLECTIVE_TIMEOUT_S
    )
    dead = results[1]
    assert not dead.reported and dead.exitcode == 3
    for r in results[:1]:
        assert r.reported and r.error is None, r.error
        assert r.value["error"] is not None, f"rank {r.rank} ran on without its peer"
        assert r.value["seconds"] < COLLECTIVE_TIMEOUT_S + 5, r.value


@pytest.mark.parametrize("expert_parallel", [2, 1], ids=["expert-parallel", "data-parallel"])
def test_stalled_rank_times_out_the_others(expert_parallel) -> None:
    timeout_s = 3.0
    waiting, _ = pool(2).run(hung_rank_worker, timeout_s, expert_parallel, timeout_s=60)
    assert waiting["error"] is not None, "the step finished without its peer"
    assert timeout_s - 0.5 < waiting["seconds"] < timeout_s + 5, waiting


def test_a_rank_that_never_joins_fails_the_join_in_the_init_timeout() -> None:
    # Rank 0 serves the store, so only moekit's own wait bounds its join: without it rank 0
    # waited the collective timeout (60 s here), then failed with a store traceback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = DistributedEnv(
        rank=0,
        world_size=2,
        local_rank=0,
        local_world_size=2,
        master_addr="127.0.0.1",
        master_port=port,
        agent_store=False,
    )
    start = time.perf_counter()
    with pytest.raises(
        TimeoutError, match=r"rank\(s\) \[1\] of 2 did not join .*--dist-init-timeout"
    ):
        init_distributed("gloo", init_timeout_s=2.0, timeout_s=60.0, env=env)
    assert time.perf_counter() - start < 10
