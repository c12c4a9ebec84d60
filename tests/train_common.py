"""Shared pieces of the data/train/checkpoint/CLI tests: a micro model and a small text corpus."""

from __future__ import annotations

import contextlib
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.config import MoEConfig
from moekit.model import ModelConfig
from moekit.train import TrainConfig

# Odd sizes so shape mix-ups show; small enough that a training step takes milliseconds.
MICRO = ModelConfig(
    vocab_size=256,
    d_model=24,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    max_seq_len=32,
    moe=MoEConfig(d_model=24, d_ff=20, num_experts=5, top_k=2),
)

MICRO_SETS = [
    "d_model=24",
    "num_layers=2",
    "num_heads=2",
    "num_kv_heads=1",
    "max_seq_len=32",
    "moe.d_ff=20",
    "moe.num_experts=5",
]


def micro_flags(corpus: Path, *extra: str) -> list[str]:
    """Command-line flags of the micro model: 4 tiny steps on `corpus`, no progress bar."""
    sets = [a for s in MICRO_SETS for a in ("--set", s)]
    flags = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2"]
    return [*sets, *flags, "--data", str(corpus), "--progress", "false", *extra]


def write_corpus(root: Path) -> Path:
    """A directory of real text: slices of two stdlib modules and some English prose."""
    root.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "shlex.py", "colorsys.py"):
        text = (stdlib / name).read_text(encoding="utf-8")[:6000]
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    prose = (
        "The quick brown fox jumps over the lazy dog. A mixture of experts routes each token "
        "to a few expert networks chosen by a learned router.\n"
    )
    (root / "prose.txt").write_text(prose * 40, encoding="utf-8")
    return root


def micro_train(data: Path, **changes) -> TrainConfig:
    """A TrainConfig of a few tiny steps on `data`."""
    base = {
        "steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "seq_len": 16,
        "warmup_steps": 2,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 3,
        "keep_checkpoints": 3,
        "data": str(data),
        "val_fraction": 0.2,
        "progress": False,
        # The references these runs are held against are computed on CPU in float32.
        "device": "cpu",
    }
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one intra-op thread: the micro models' ops are too small to gain from more,
    and on a shared machine two spinning OpenMP threads make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Crash(Exception):
    """Raised where a training step would begin, as a killed run stops there."""


@contextlib.contextmanager
def crash_at(step: int):
    """Within the block, training stops with Crash when it asks for the batch of `step`."""
    from moekit.data.batches import TrainBatches

    real_call = TrainBatches.__call__

    def call(self, at):
        if at == step:
            raise Crash
        return real_call(self, at)

    TrainBatches.__call__ = call
    try:
        yield
    finally:
        TrainBatches.__call__ = real_call
