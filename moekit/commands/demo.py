"""`moekit demo`: the main job. Train the tiny MoE preset on the embedded corpus, sample, plot.

Sized for a few minutes on 2 CPU cores: byte-level text, short sequences, a few hundred
steps. Everything lands in the run directory (default runs/demo): metrics.jsonl,
checkpoints/, loss.png and expert_load.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = ("def ", "The ", "class ")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: train tiny on the embedded corpus, sample")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: 800)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data and sampling")
    p.add_argument("--run-dir", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    from moekit.commands.train import add_threads_argument

    # One thread by default: on 2 shared cores the tiny model's many small ops ran a step
    # in 0.2 s on one thread and 1.5-3 s on two, which spin-wait on each other under load.
    add_threads_argument(p, default=1)


def _start_over(run_dir: Path) -> None:
    """The demo always starts over (`moekit train` refuses to mix two runs instead), but
    removes only a run it wrote itself: --run-dir may name any directory.

    Its runs are known by what their newest checkpoint records (_demo_run), not by a
    marker file: a marker outlives the checkpoints it vouched for, and another run
    trained into the same directory later would have been removed on its word.
    """
    import shutil

    from moekit.train.checkpoint import checkpoint_dir

    checkpoints = checkpoint_dir(run_dir)
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        if not _demo_run(run_dir):
            raise ValueError(
                f"{run_dir} holds checkpoints of a run that moekit demo did not write; "
                "choose another --run-dir (or delete that run yourself)"
            )
        print(f"removing the previous demo run in {run_dir}")
        shutil.rmtree(checkpoints)
    run_dir.mkdir(parents=True, exist_ok=True)


def demo_config(steps: int, batch_size: int, seq_len: int, seed: int, progress: bool = True):
    """The demo's TrainConfig: everything but these flags is fixed by the demo."""
    from moekit.train.config import TrainConfig

    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        warmup_steps=min(20, steps // 10),
        eval_every=max(1, steps // 10),
        checkpoint_every=0,
        seed=seed,
        progress=progress,
    )


def _demo_run(run_dir: Path) -> bool:
    """A run as the demo writes it: the tiny preset, and every training setting the one
    the demo derives from the run's own steps, batch, sequence length and seed (only the
    progress bar may differ). A `moekit train` run that happens to share the preset,
    the corpus and checkpoint_every 0 differs in its warm-up, evaluation or learning
    rate, and is not the demo's to delete."""
    import json

    from moekit.errors import CheckpointError
    from moekit.model import get_preset
    from moekit.train.checkpoint import list_checkpoints, read_config

    found = list_checkpoints(run_dir)
    try:
        config = read_config(found[-1]) if found else {}
        train, model = dict(config["train"]), config["model"]
        expected = demo_config(train["steps"], train["batch_size"], train["seq_len"], train["seed"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return False
    as_read = json.loads(json.dumps(expected.to_dict()))  # as read back from JSON
    tiny = json.loads(json.dumps(get_preset("tiny").to_dict()))
    train.pop("progress", None)
    as_read.pop("progress", None)
    return train == as_read and model == tiny


def run(args: argparse.Namespace) -> int:
    import time

    from moekit.commands.sample import sample_text
    from moekit.commands.train import apply_threads
    from moekit.data.tokenizer import load_tokenizer
    from moekit.errors import MissingDependency
    from moekit.figures import INSTALL_HINT, have_matplotlib
    from moekit.model import count_parameters, get_preset
    from moekit.train import preflight
    from moekit.train.loop import train
    from moekit.validate import SEED_MAX

    apply_threads(args)
    if not have_matplotlib():  # the demo ends with its figures: say so before training
        raise MissingDependency(f"the demo draws figures and needs matplotlib: {INSTALL_HINT}")
    start = time.perf_counter()
    model_config = get_preset("tiny")
    config = demo_config(args.steps, args.batch_size, args.seq_len, args.seed, not args.no_progress)
    run_dir = Path(args.run_dir)
    # Before the last demo is removed: a bad flag must not cost it.
    preflight.check_seq_len(config, model_config)
    _start_over(run_dir)
    total, active = count_parameters(model_config)
    moe = model_config.moe
    print(
        f"moekit demo: the tiny MoE preset ({model_config.num_layers} layers, "
        f"{moe.num_experts} experts, top-{moe.top_k}; {total / 1e6:.2f}M parameters, "
        f"{active / 1e6:.2f}M active) on the embedded corpus (Python stdlib code + reference "
        f"prose), {config.steps} steps of {config.tokens_per_step} byte tokens"
    )
    result = train(model_config, config, run_dir)
    print(f"validation loss {result.val_loss:.3f} nats/byte", end="")
    for name, loss in sorted(result.val_losses_by_domain.items()):
        print(f", {name} {loss:.3f}", end="")
    print(f"; {result.tokens_per_s:.0f} training tokens/s")

    from moekit.train.checkpoint import load_model

    model = load_model(run_dir)
    tokenizer = load_tokenizer(config.tokenizer)
    print("\nsamples (temperature 0.8, top-k 40):")
    for i, prompt in enumerate(PROMPTS):
        seed = (args.seed + i) % (SEED_MAX + 1)  # one seed per prompt, within torch's range
        (text,) = sample_text(model, tokenizer, prompt, 120, 1, 0.8, 40, None, seed)
        print(f"--- {prompt!r}\n{prompt}{text}")
    print()
    for path in result.plots:
        print(f"plot: {path.resolve()}")
    from moekit.analysis import analyze_checkpoint, format_summary

    # Four batches of 8 windows per domain (8k tokens at S=128): stable loads, and well
    # under a minute on 2 shared CPU cores (42 s measured, including the figures).
    summary = analyze_checkpoint(run_dir, seq_len=config.seq_len, batches_per_domain=4)
    print("\n" + format_summary(summary))
    print(f"checkpoint: {run_dir / 'checkpoints'}; sample more with: moekit sample {run_dir}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0
