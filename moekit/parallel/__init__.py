"""Expert parallelism (and data parallelism beside it) over torch.distributed.

Applied from outside to a model built on one device: `apply_expert_parallel(model, group)`
shards the experts and swaps local dispatch for all-to-all; `ParallelContext` is what the
training loop holds (set-up, batch sharding, gradient averaging, unsharded checkpoints).
"""

from moekit.parallel.all_to_all import AllToAllPath, GroupStatsPath
from moekit.parallel.context import ParallelContext
from moekit.parallel.expert_parallel import (
    ShardedExpertBank,
    apply_expert_parallel,
    expert_parameter_names,
    share_balancing_stats,
)
from moekit.parallel.pool import WorkerPool
from moekit.parallel.process_group import close_distributed, init_distributed

__all__ = [
    "AllToAllPath",
    "GroupStatsPath",
    "ParallelContext",
    "ShardedExpertBank",
    "WorkerPool",
    "apply_expert_parallel",
    "close_distributed",
    "expert_parameter_names",
    "init_distributed",
    "share_balancing_stats",
]
