"""Training: TrainConfig, the loop, AdamW + schedule, checkpoints and JSONL metrics."""

from moekit.train.checkpoint import CheckpointError, load_checkpoint, load_model
from moekit.train.config import TrainConfig
from moekit.train.loop import TrainResult, train

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "load_checkpoint",
    "load_model",
    "train",
]
