"""A rank that dies mid-step turns into an error on the others within the timeout, not a hang."""

from __future__ import annotations

import pytest
from parallel_cases import dead_rank_worker

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
