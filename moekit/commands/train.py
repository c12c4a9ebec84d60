"""`moekit train`: train a model preset on the embedded corpus or your own text.

    moekit train --preset tiny --set moe.top_k=4 --set d_model=256 --steps 300
    moekit train --run-dir runs/tiny --resume          # continue from the newest checkpoint

Flow: parse -> build_configs(args) -> train(...). Extra launch modes (e.g. several
processes) add flags in add_parser and pass a `parallel` context to train().
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--preset, --set and --dense-twin: the model half of train and compare."""
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ModelConfig field, moe.FIELD for the MoE layer (repeatable)",
    )


def add_threads_argument(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=default,
        help="torch intra-op threads (default: "
        + ("torch's choice" if default is None else str(default))
        + "); 1 is fastest for small models on a busy machine",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op thread count from --threads (when given)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from moekit.train.config import TrainConfig
    from moekit.train.overrides import add_config_flags

    p = sub.add_parser("train", help="train a model; writes metrics, checkpoints and plots")
    add_model_arguments(p)
    p.add_argument(
        "--dense-twin", action="store_true", help="train the preset's dense twin instead"
    )
    p.add_argument("--run-dir", default=None, help="output directory (default: runs/<preset>)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue exactly from a checkpoint (default: the run directory's newest)",
    )
    add_threads_argument(p)
    add_config_flags(p, TrainConfig)
    from moekit.parallel.flags import add_parallel_arguments

    add_parallel_arguments(p)


def build_configs(args: argparse.Namespace):
    """(ModelConfig, TrainConfig) from the parsed arguments."""
    from moekit.model import dense_twin, get_preset
    from moekit.train.config import TrainConfig
    from moekit.train.overrides import apply_overrides, config_from_flags

    model_config = apply_overrides(get_preset(args.preset), args.overrides)
    if getattr(args, "dense_twin", False):
        model_config = dense_twin(model_config)
    return model_config, config_from_flags(TrainConfig, args)


def run(args: argparse.Namespace) -> int:
    from moekit.parallel.flags import context_from_args

    parallel = context_from_args(args)  # None unless started by torchrun
    try:
        return _train(args, parallel)
    finally:
        if parallel is not None:
            parallel.close()


def _train(args: argparse.Namespace, parallel) -> int:
    from moekit.model import count_parameters
    from moekit.train.loop import train

    apply_threads(args)
    model_config, train_config = build_configs(args)
    run_dir = Path(args.run_dir or f"runs/{args.preset}")
    # Under torchrun every rank runs this; one of them reports.
    say = print if parallel is None or parallel.is_main else (lambda *a, **k: None)
    if parallel is not None:
        # Rank 0 tokenizes into the shared cache while the others wait, then all reuse it.
        from moekit.data.tokenizer import load_tokenizer
        from moekit.data.tokens import prepare_tokens

        if parallel.is_main:
            tokenizer = load_tokenizer(train_config.tokenizer)
            prepare_tokens(
                train_config.data, tokenizer, run_dir / "cache", train_config.val_fraction
            )
        parallel.barrier()
    resume = None
    if args.resume is not None:
        resume = run_dir if args.resume == "latest" else Path(args.resume)
    total, active = count_parameters(model_config)
    say(
        f"training {args.preset}{' (dense twin)' if args.dense_twin else ''}: "
        f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
        f"{train_config.steps} steps of {train_config.tokens_per_step} tokens -> {run_dir}"
    )
    result = train(model_config, train_config, run_dir, resume=resume, parallel=parallel)
    say(
        f"done: train loss {result.train_loss:.4f}, validation loss {result.val_loss:.4f}, "
        f"{result.tokens_per_s:.0f} tokens/s"
    )
    for name, loss in sorted(result.val_losses_by_domain.items()):
        say(f"  validation loss on {name}: {loss:.4f}")
    say(f"metrics: {run_dir / 'metrics.jsonl'}  checkpoints: {run_dir / 'checkpoints'}")
    for path in result.plots:
        say(f"plot: {path}")
    return 0
