"""`moekit train`: train a model preset on the embedded corpus or your own text.

    moekit train --preset tiny --set moe.top_k=4 --set d_model=256 --steps 300
    moekit train --run-dir runs/tiny --resume          # continue from the newest checkpoint
    moekit train --init-from runs/tiny --data my_text/ # a new run from trained weights

Flow: parse -> (load_init_source) -> build_configs(args) -> train(...). Extra launch modes
(e.g. several processes) add flags in add_parser and pass a `parallel` context to train().
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_PRESET = "tiny"


def preset_name(args: argparse.Namespace) -> str:
    return args.preset or DEFAULT_PRESET


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--preset, --set and --dense-twin: the model half of train and compare."""
    p.add_argument("--preset", default=None, help=f"model preset (default: {DEFAULT_PRESET})")
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
    p.add_argument(
        "--run-dir",
        default=None,
        help="output directory (default: runs/<preset>, or runs/from-<SRC name> with --init-from)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="SRC",
        help="begin a new run from the weights of a moekit checkpoint or run directory, or of "
        "a Hugging Face checkpoint directory; the model config is SRC's (--set may change "
        "what keeps the weights' shapes) and the tokenizer SRC's unless --tokenizer is given",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue exactly from a checkpoint (default: the run directory's newest); a "
        "CHECKPOINT continues in its own run directory unless --run-dir names an empty one "
        "(--init-from SRC is then not read: the checkpoint holds the weights)",
    )
    add_threads_argument(p)
    add_config_flags(p, TrainConfig)
    from moekit.parallel.flags import add_parallel_arguments

    add_parallel_arguments(p)


def build_configs(args: argparse.Namespace, source=None):
    """(ModelConfig, TrainConfig) from the parsed arguments, and `source` (an InitSource)
    when the run begins from one's weights."""
    from moekit.model import dense_twin, get_preset
    from moekit.train.config import TrainConfig
    from moekit.train.overrides import apply_overrides, config_from_flags

    if source is None:
        model_config = apply_overrides(get_preset(preset_name(args)), args.overrides)
        if getattr(args, "dense_twin", False):
            model_config = dense_twin(model_config)
        return model_config, _absolute_paths(config_from_flags(TrainConfig, args))
    if args.preset is not None or args.dense_twin:
        flag = "--preset" if args.preset is not None else "--dense-twin"
        raise ValueError(f"--init-from takes the model from {source.path}; drop {flag}")
    base = TrainConfig()
    if args.cfg_tokenizer is None:
        if source.tokenizer is None:
            raise ValueError(
                f"{source.path} has no tokenizer.json to say what its token ids mean: pass "
                "--tokenizer (bytes, or the path of the model's tokenizer.json)"
            )
        base = base.replace(tokenizer=source.tokenizer)
    model_config = apply_overrides(source.config, args.overrides)
    return model_config, _absolute_paths(config_from_flags(TrainConfig, args, base=base))


def _absolute_paths(config):
    # The checkpoint records the paths; sample, analyze and --resume may run elsewhere.
    from moekit.data.sources import absolute
    from moekit.data.tokenizer import absolute_tokenizer

    tokenizer = absolute_tokenizer(config.tokenizer)
    return config.replace(data=absolute(config.data), tokenizer=tokenizer)


def _run_dir_and_resume(args: argparse.Namespace, default: Path) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume (None for a new run).

    `--resume CHECKPOINT` without --run-dir continues in the checkpoint's own run directory,
    not the preset's default, which may hold another run.
    """
    from moekit.train.checkpoint import resolve, run_dir_of

    if args.resume is None:
        return default, None
    if args.resume == "latest":
        return default, resolve(default)
    checkpoint = resolve(args.resume)
    if args.run_dir is not None:
        return Path(args.run_dir), checkpoint
    return run_dir_of(checkpoint) or default, checkpoint


def _init_source(src: str, resume: Path | None):
    """What --init-from gives: SRC's config, tokenizer and weights for a new run. A resumed
    run's weights, model config and tokenizer setting are all in its checkpoint (a tokenizer
    file taken from SRC was copied into the run), so SRC is not read and may be gone."""
    from dataclasses import replace

    from moekit.hf.convert import load_init_source

    if resume is None:
        return load_init_source(src)
    # Config and tokenizer from the checkpoint; train reads its weights as a resumed run's.
    return replace(load_init_source(resume), path=Path(src))


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
    if args.init_from is None:
        name = preset_name(args) + (" (dense twin)" if args.dense_twin else "")
        default_dir = f"runs/{preset_name(args)}"
    else:
        name = f"from {args.init_from}"
        default_dir = f"runs/from-{Path(args.init_from).resolve().name}"
    run_dir, resume = _run_dir_and_resume(args, Path(args.run_dir or default_dir))
    source = None
    if args.init_from is not None:
        source = _init_source(args.init_from, resume)
    model_config, train_config = build_configs(args, source)
    # Under torchrun every rank runs this; one of them reports.
    say = print if parallel is None or parallel.is_main else (lambda *a, **k: None)
    total, active = count_parameters(model_config)
    say(
        f"training {name}: "
        f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; "
        f"{train_config.steps} steps of {train_config.tokens_per_step} tokens -> {run_dir}"
    )
    result = train(
        model_config, train_config, run_dir, resume=resume, parallel=parallel, init_from=source
    )
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
