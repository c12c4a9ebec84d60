"""`moekit compare`: train an MoE preset and its dense twin on the same tokens, then compare.

    moekit compare --preset tiny --steps 300
    moekit compare --preset tiny --steps 1500 --seeds 0-6   # one comparison per seed
    moekit compare --preset tiny --steps 1500 --seeds 0-6 --resume   # after an interruption

Prints a table (validation loss, training FLOPs, tokens/s, total and active parameters)
and writes compare.png (validation loss against training FLOPs) and compare.json. With
--seeds, one comparison per seed in seed_<s>/, then each seed's losses and whether the
difference is more than the draw (moekit.train.compare_seeds), also in seeds.json.
--resume continues an interrupted comparison with the same flags: finished models are
read back, an interrupted one continues from its newest checkpoint, exactly as
`moekit train --resume`, and what had not begun trains.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from moekit.commands.train import add_model_arguments, add_threads_argument
    from moekit.train.config import TrainConfig
    from moekit.train.overrides import add_config_flags

    p = sub.add_parser("compare", help="train an MoE preset and its dense twin, compare them")
    add_model_arguments(p)
    p.add_argument(
        "--out-dir", default=None, help="output directory (default: runs/compare-<preset>)"
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        metavar="LIST",
        help="compare once per seed, e.g. 0,1,2 or 0-6, and summarise (instead of --seed)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted comparison in --out-dir, given the same flags: finished "
        "models are read back, an interrupted one continues from its newest checkpoint",
    )
    add_threads_argument(p)
    add_config_flags(p, TrainConfig)


def parse_seeds(text: str) -> list[int]:
    """'0,2,5' or '0-6' (inclusive) or a mix: '0-2,7'. compare_seeds checks the list."""
    seeds = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)  # "0-" and "x" fail here
            if last < first:
                raise ValueError(part)  # "5-2" would be an empty range
            seeds += range(first, last + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must look like 0,1,2 or 0-6, got {text!r}"
        ) from None
    return seeds


def run(args: argparse.Namespace) -> int:
    from moekit.commands.train import apply_threads, build_configs, preset_name
    from moekit.train.compare import compare, format_table

    apply_threads(args)
    model_config, train_config = build_configs(args)
    out_dir = Path(args.out_dir or f"runs/compare-{preset_name(args)}")
    if args.seeds is not None:
        return _run_seeds(args, model_config, train_config, out_dir)
    rows, plot = compare(model_config, train_config, out_dir, resume=args.resume)
    print(format_table(rows))
    moe, dense = rows
    verdict = "lower" if moe.val_loss < dense.val_loss else "higher (or equal)"
    print(
        f"MoE validation loss is {verdict} than the dense twin's at (nearly) equal training "
        f"FLOPs: {moe.val_loss:.4f} vs {dense.val_loss:.4f}. MoE tokens/s is "
        f"{moe.tokens_per_s / dense.tokens_per_s:.2f}x the dense twin's (runs one after the "
        "other; benchmarks/bench_train.py interleaves them for a fairer ratio)"
    )
    if plot is not None:
        print(f"plot: {plot}")
    print(f"table: {out_dir / 'compare.json'}")
    return 0


def _run_seeds(args: argparse.Namespace, model_config, train_config, out_dir: Path) -> int:
    from moekit.figures import have_matplotlib
    from moekit.train.compare_seeds import compare_seeds, format_seed_table

    if args.cfg_seed is not None:
        raise ValueError("give --seed or --seeds, not both")
    summary = compare_seeds(model_config, train_config, out_dir, args.seeds, resume=args.resume)
    print(format_seed_table(summary))
    figure = "compare.png" if have_matplotlib() else "compare.json"
    print(f"per seed: {out_dir}/seed_<s>/{figure}  summary: {out_dir / 'seeds.json'}")
    return 0
