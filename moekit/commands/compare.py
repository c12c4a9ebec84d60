"""`moekit compare`: train an MoE preset and its dense twin on the same tokens, then compare.

    moekit compare --preset tiny --steps 300

Prints a table (validation loss, training FLOPs, tokens/s, total and active parameters)
and writes compare.png (validation loss against training FLOPs) and compare.json.
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
    add_threads_argument(p)
    add_config_flags(p, TrainConfig)


def run(args: argparse.Namespace) -> int:
    from moekit.commands.train import apply_threads, build_configs, preset_name
    from moekit.train.compare import compare, format_table

    apply_threads(args)
    model_config, train_config = build_configs(args)
    out_dir = Path(args.out_dir or f"runs/compare-{preset_name(args)}")
    rows, plot = compare(model_config, train_config, out_dir)
    print(format_table(rows))
    moe, dense = rows
    verdict = "lower" if moe.val_loss < dense.val_loss else "higher (or equal)"
    print(
        f"MoE validation loss is {verdict} than the dense twin's at (nearly) equal training "
        f"FLOPs: {moe.val_loss:.4f} vs {dense.val_loss:.4f}. MoE tokens/s is "
        f"{moe.tokens_per_s / dense.tokens_per_s:.2f}x the dense twin's (runs one after the "
        "other; benchmarks/bench_train.py interleaves them for a fairer ratio)"
    )
    print(f"plot: {plot}\ntable: {out_dir / 'compare.json'}")
    return 0
