"""`moekit analyze`: how a trained model routes its tokens, as a table, PNGs and JSON."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="routing analysis of a checkpoint: load, imbalance, dead experts, specialisation",
        description=(
            "Run the validation split of a checkpoint's text through it and report, per MoE "
            "layer, the load imbalance, dead experts, router entropy and how much the experts "
            "specialise by domain (code vs prose for the embedded corpus); writes PNG figures "
            "and routing.json."
        ),
    )
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory, a run directory (its newest checkpoint) or an HF model dir",
    )
    p.add_argument(
        "--data",
        default=None,
        help="text to analyse instead of the training data: embedded, a file or a directory",
    )
    p.add_argument(
        "--out",
        default=None,
        help="directory for the figures and routing.json (default: RUN_DIR/analysis for a "
        "training run's checkpoint, else CHECKPOINT/analysis)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length, at most the model's max_seq_len (default: training)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--batches", type=int, default=8, help="batches of windows from each domain")
    p.add_argument(
        "--dead-threshold",
        type=float,
        default=0.1,
        help="an expert is dead below this fraction of its fair share (1/E) of assignments",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="token cache (default: the training run's cache, else OUT/cache)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="bytes or a tokenizer.json (default: the checkpoint's own)",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available)"
    )


def run(args: argparse.Namespace) -> int:
    from moekit.analysis import analyze_checkpoint, format_summary
    from moekit.errors import MissingDependency
    from moekit.figures import INSTALL_HINT, have_matplotlib
    from moekit.validate import check_int, check_range

    # Named as the user typed them; analyze_checkpoint would name its own arguments.
    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size)):
        check_int(flag, value)
    check_range("--dead-threshold", args.dead_threshold, 0.0, 1.0)  # before the text is read
    if args.seq_len is not None:
        check_int("--seq-len", args.seq_len)
    if not have_matplotlib():  # before minutes of forward passes, not after
        raise MissingDependency(f"analyze draws figures and needs matplotlib: {INSTALL_HINT}")
    summary = analyze_checkpoint(
        args.checkpoint,
        out_dir=args.out,
        data=args.data,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        batches_per_domain=args.batches,
        dead_threshold=args.dead_threshold,
        cache_dir=args.cache_dir,
        device=args.device,
        progress=True,
        tokenizer=args.tokenizer,
    )
    print(format_summary(summary))
    return 0
