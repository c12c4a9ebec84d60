"""MoE against its dense twin over several seeds: is the difference more than the draw?

A seed draws both models' initial weights and their training windows, so one comparison is
one draw. Over n seeds this reports each seed's validation losses and their difference
(MoE - dense: negative where the MoE is better), the mean difference with its standard
deviation and standard error, the paired t statistic (mean / standard error), and a
two-sided sign test on the number of seeds each model wins (exact binomial, ties left
out): the chance that a fair coin splits the seeds at least as unevenly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from moekit import atomic
from moekit.train.compare import (
    MODELS,
    check_new_comparison,
    check_not_file,
    compare,
    has_runs,
    split_rule_of_runs,
    text_table,
)
from moekit.train.config import TrainConfig


@dataclass(frozen=True)
class SeedResult:
    seed: int
    moe_val_loss: float
    dense_val_loss: float

    @property
    def diff(self) -> float:
        """MoE - dense validation loss; negative where the MoE is better."""
        return self.moe_val_loss - self.dense_val_loss


@dataclass(frozen=True)
class SeedSummary:
    results: list[SeedResult]
    mean_diff: float
    sd_diff: float
    """Sample standard deviation (n - 1) of the differences; nan for one seed."""
    stderr: float
    t: float
    """mean_diff / stderr, the paired t statistic; nan for one seed or equal differences."""
    moe_wins: int
    dense_wins: int
    sign_test_p: float


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a fair coin splits wins + losses at least this unevenly)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarize(results: list[SeedResult]) -> SeedSummary:
    """The statistics of the module docstring over the seeds' results."""
    if not results:
        raise ValueError("summarize needs at least one seed's result")
    diffs = [r.diff for r in results]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else math.nan
    stderr = sd / math.sqrt(n)
    t = mean / stderr if stderr > 0 else math.nan
    moe_wins = sum(d < 0 for d in diffs)
    dense_wins = sum(d > 0 for d in diffs)
    return SeedSummary(
        results, mean, sd, stderr, t, moe_wins, dense_wins, sign_test_p(moe_wins, dense_wins)
    )


def compare_seeds(
    model_config,
    config: TrainConfig,
    out_dir: str | Path,
    seeds: list[int],
    parallel=None,
    resume: bool = False,
) -> SeedSummary:
    """`compare` once per seed into out_dir/seed_<s> (one shared token cache); writes
    out_dir/seeds.json with every seed's losses and the summary.

    resume: continue an interrupted run of the same seeds: each seed's comparison
    continues where it stopped (`compare`'s resume), and seeds not yet begun start.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    # Every seed's config now (each validates its seed): a bad last seed must not be
    # found only after the others have trained.
    configs = [config.replace(seed=seed) for seed in seeds]
    out_dir = Path(out_dir)
    if resume:
        _check_seeds_to_resume(out_dir, seeds)
    else:
        for seed in seeds:  # and every seed's directory, for the same reason
            check_new_comparison(out_dir / f"seed_{seed}")
    results = []
    # Resumed, seeds not yet begun split the text as the others did: one set of tokens.
    runs = [out_dir / f"seed_{seed}" / name for seed in seeds for name in MODELS]
    split_rule = split_rule_of_runs(runs) if resume else None
    for seed, seed_config in zip(seeds, configs, strict=True):
        rows, _ = compare(
            model_config,
            seed_config,
            out_dir / f"seed_{seed}",
            parallel=parallel,
            cache_dir=out_dir / "cache",
            resume=resume and has_runs(out_dir / f"seed_{seed}"),
            split_rule=split_rule,
        )
        moe, dense = rows
        results.append(SeedResult(seed, moe.val_loss, dense.val_loss))
    summary = summarize(results)
    record = {
        **{k: v for k, v in asdict(summary).items() if k != "results"},
        "seeds": [{**asdict(r), "diff": r.diff} for r in results],
        "train": config.to_dict(),
    }
    atomic.write_json(out_dir / "seeds.json", record)
    return summary


def _check_seeds_to_resume(out_dir: Path, seeds: list[int]) -> None:
    """ValueError unless some seed's comparison has a checkpoint to continue from; a
    directory of another seed is named, since --seeds must list the first run's seeds."""
    check_not_file(out_dir)
    listed = {f"seed_{s}" for s in seeds}
    others = sorted(
        p.name
        for p in (out_dir.iterdir() if out_dir.is_dir() else [])
        if p.name.startswith("seed_") and p.name not in listed and has_runs(p)
    )
    if others:
        raise ValueError(
            f"--resume: {out_dir} holds comparisons of seeds not in --seeds ({', '.join(others)}); "
            "give the seeds of the run to continue"
        )
    if not any(has_runs(out_dir / f"seed_{s}") for s in seeds):
        raise ValueError(
            f"--resume: {out_dir} holds no comparison of seeds {seeds} to continue; run "
            "without --resume to start one"
        )


def format_seed_table(summary: SeedSummary) -> str:
    """One line per seed, a line of means, then the summary's numbers."""
    results = summary.results

    def row(name: str, moe: float, dense: float, diff: float) -> list[str]:
        return [name, f"{moe:.4f}", f"{dense:.4f}", f"{diff:+.4f}"]

    lines = [["seed", "MoE val", "dense val", "MoE - dense"]]
    lines += [row(str(r.seed), r.moe_val_loss, r.dense_val_loss, r.diff) for r in results]
    n = len(results)
    mean_moe = sum(r.moe_val_loss for r in results) / n
    mean_dense = sum(r.dense_val_loss for r in results) / n
    lines.append(row("mean", mean_moe, mean_dense, summary.mean_diff))
    return (
        f"{text_table(lines)}\n"
        f"MoE better in {summary.moe_wins} of {n} seeds, dense in {summary.dense_wins}; "
        f"mean difference {summary.mean_diff:+.4f} (sd {summary.sd_diff:.4f}, standard error "
        f"{summary.stderr:.4f}, t = {summary.t:.2f}); sign test p = {summary.sign_test_p:.3f}"
    )
