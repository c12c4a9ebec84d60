"""Warm start: a new run's first weights from a trained moekit run or a Hugging Face checkpoint.

`moekit train --init-from SRC` begins a new run from SRC's weights, for example to train a
converted Mixtral/Qwen-MoE/OLMoE/DeepSeek checkpoint further on your own text. Only the
weights come from SRC: the optimizer moments, the learning-rate schedule, the data order and
the step counter start afresh (`--resume` is the way to continue a run where it stopped).
The model config is SRC's, so the weights fit; `--set` may change what leaves the weights'
shapes alone (loss coefficients, router noise, capacity), and a change of shape is refused
by name when the weights load.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from moekit.errors import CheckpointError
from moekit.model.config import ModelConfig
from moekit.train.checkpoint import check_model_names
from moekit.train.config import TrainConfig

RUN_TOKENIZER = "tokenizer.json"
"""Where a warm-started run keeps the tokenizer file it took from SRC, in its directory."""


@dataclass(frozen=True)
class InitSource:
    """What a run starts from: SRC's model config and tokenizer, and how to read its weights.

    Made by `moekit.hf.convert.load_init_source`, which knows both kinds of checkpoint.
    The weights are read only when asked for: training first checks from the config that
    the model fits in memory, and a source of hundreds of GiB is refused before it is read.
    """

    path: Path
    config: ModelConfig
    tokenizer: str | None
    """What SRC's token ids mean: "bytes" or the path of a tokenizer.json; None for a
    Hugging Face directory without a tokenizer.json, which says nothing about it."""
    read_state: Callable[[], dict[str, Tensor]] = field(compare=False, repr=False)
    """Reads (and verifies) the full, unsharded state dict under moekit's names;
    CheckpointError says what is wrong with it."""


def check_initial_weights(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """CheckpointError naming every tensor of `state` (read from SRC `path`) whose name or
    shape differs from `model`'s; `model` may live on the meta device."""
    check_model_names(model, state)
    own = model.state_dict()
    differ = [
        f"{name}: {tuple(t.shape)} in {path}, {tuple(own[name].shape)} here"
        for name, t in state.items()
        if t.shape != own[name].shape
    ]
    if differ:
        raise CheckpointError(
            f"--init-from {path}: {len(differ)} weight(s) have another shape (was a "
            "size changed with --set?): " + "; ".join(differ[:3]) + ("; ..." if differ[3:] else "")
        )


def tokenizer_to_copy(
    config: TrainConfig, source: InitSource | None, run_dir: Path
) -> tuple[Path, Path] | None:
    """(SRC's tokenizer file, its place in run_dir) when a new run takes its tokenizer from
    SRC, else None.

    The run keeps its own copy, so that sampling, analysis, conversion and --resume need
    nothing from SRC, which may be a large download to delete once training is done. A
    tokenizer the user named (another file than SRC's) stays where they keep it. A
    different file already in run_dir under that name is refused, not overwritten.
    """
    if source is None or source.tokenizer in (None, "bytes") or config.tokenizer == "bytes":
        return None
    src = Path(source.tokenizer).resolve()
    if Path(config.tokenizer).resolve() != src:
        return None
    dst = (Path(run_dir) / RUN_TOKENIZER).resolve()
    if dst != src and dst.exists() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
        raise ValueError(
            f"run directory {run_dir} already holds a {RUN_TOKENIZER} that is not {src}: a "
            "run started with --init-from keeps its source's tokenizer there; move that file "
            "or choose another --run-dir"
        )
    return src, dst


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy src to dst through a temporary file and a rename: never a half-written dst."""
    if src == dst:
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)
