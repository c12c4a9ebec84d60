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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from moekit.errors import CheckpointError
from moekit.model.config import ModelConfig
from moekit.train.checkpoint import check_model_names


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
