"""Where a run of experts puts its per-row results before they are summed into tokens.

Shapes: D model dim, N rows of one expert; a run covers experts whose assignments are
contiguous (grouped by expert), from row `lo` to `hi`.

Used by the CPU fused expert loop (moekit.fused_experts) for its forward output and its
input gradient: both are sums over each token's assignments.
"""

from __future__ import annotations

from torch import Tensor


class ExpertScatter:
    """One buffer for a run's rows, summed into tokens by index_add_, in the reference's order.

    In the plain loop: one buffer for all the run's rows, summed by one index_add_ after
    the loop (one scatter of 8192 rows x 128 took 225 us where eight of 1024 took 461 us).
    Runs on side-by-side workers (per_expert): one expert-sized buffer per worker, reused
    expert after expert, each result scattered while still in cache. Two workers
    allocating run-sized buffers (64 MiB each for the fine benchmark layer) fault in
    fresh pages at the same time, and that contends; the fine layer's forward+backward
    went from 1704 to 1642 ms, where the coarse one (plain loop) measured 1521 against
    1540 ms the same way. Either way the sums run expert after expert, in token order
    within each: the reference's order.
    """

    def __init__(
        self,
        like: Tensor,
        rows_A: Tensor,
        experts: list[int],
        counts: list[int],
        starts: list[int],
        per_expert: bool,
    ) -> None:
        lo, hi = starts[experts[0]], starts[experts[-1]] + counts[experts[-1]]
        self.lo, self.per_expert, self.rows_A = lo, per_expert, rows_A
        num_rows = max(counts[e] for e in experts) if per_expert else hi - lo
        self.buf_ND = like.new_empty(num_rows, like.shape[1])
        self.span = slice(lo, hi)

    def rows(self, sl: slice) -> Tensor:
        """Where the expert owning assignments `sl` writes its [N, D] result."""
        if self.per_expert:
            return self.buf_ND[: sl.stop - sl.start]
        return self.buf_ND[sl.start - self.lo : sl.stop - self.lo]

    def written(self, out: Tensor, sl: slice, result_ND: Tensor) -> None:
        """An expert's result is in place: scatter it now when buffers are per expert."""
        if self.per_expert:
            out.index_add_(0, self.rows_A[sl], result_ND)

    def finish(self, out: Tensor) -> None:
        """After the loop: the one scatter of the whole run, when not per expert."""
        if not self.per_expert:
            out.index_add_(0, self.rows_A[self.span], self.buf_ND)
