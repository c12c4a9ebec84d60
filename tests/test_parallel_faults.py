"""A rank that dies or stalls mid-step turns into an error on the others in bounded time."""

from __future__ import annotations

import pytest
from parallel_cases import dead_rank_worker, hung_rank_worker, pool

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
