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

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from moekit.errors import CheckpointError
from moekit.model.config import ModelConfig
from moekit.train.checkpoint import check_model_names


@dataclass(frozen=True)
class InitSource:
    """What a run starts from: SRC's model config, weights and tokenizer.

    Read by `moekit.hf.convert.load_init_source`, which knows both kinds of checkpoint.
    """

    path: Path
    config: ModelConfig
    state: dict[str, Tensor]
    """The full (unsharded) state dict under moekit's names."""
    tokenizer: str | None
    """What SRC's token ids mean: "bytes" or the path of a tokenizer.json; None for a
    Hugging Face directory without a tokenizer.json, which says nothing about it."""


def load_initial_weights(model: nn.Module, source: InitSource) -> None:
    """Copy SRC's weights into `model` (a fresh, unsharded Transformer); CheckpointError
    names every tensor whose name or shape differs."""
    check_model_names(model, source.state)
    own = model.state_dict()
    differ = [
        f"{name}: {tuple(t.shape)} in {source.path}, {tuple(own[name].shape)} here"
        for name, t in source.state.items()
        if t.shape != own[name].shape
    ]
    if differ:
        raise CheckpointError(
            f"--init-from {source.path}: {len(differ)} weight(s) have another shape (was a "
            "size changed with --set?): " + "; ".join(differ[:3]) + ("; ..." if differ[3:] else "")
        )
    model.load_state_dict(source.state, strict=True)
