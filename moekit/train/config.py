"""TrainConfig: every setting of a training run, validated when it is made."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from moekit.validate import check_bool, check_choice, check_int, check_range, check_seed

DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("none", "default", "reduce-overhead")
# Fields that say how a run computes, not what: they may differ on --resume (the result is
# then the same training, though bitwise only on the same device and compile mode).
RESUMABLE_FIELDS = frozenset(
    {"eval_every", "checkpoint_every", "keep_checkpoints", "progress", "device", "compile"}
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimisation, data, evaluation and checkpointing."""

    steps: int = 300
    """Optimizer steps to train for."""
    batch_size: int = 16
    """Sequences per optimizer step (the global batch, over all micro-batches and ranks)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; batch_size must be a multiple of it. Gradients
    are summed, but each micro-batch's balancing losses (and capacity) see its own tokens,
    as in Megatron: not the same step as one batch, or as data parallelism (whose loss
    statistics are summed over the ranks), unless the balancing coefficients are 0."""
    seq_len: int = 128
    """Tokens per training sequence (at most the model's max_seq_len)."""
    lr: float = 3e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to lr (at most steps - 1: the last step is the floor)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, biases or the router bias)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seed of the initial weights and of the training windows."""
    data: str = "embedded"
    """Text: embedded (stdlib code + reference prose), a file, a directory, or hf:NAME[:CONFIG]."""
    tokenizer: str = "bytes"
    """bytes (V=256) or a path to a tokenizer.json, which the run copies into its directory."""
    val_fraction: float = 0.1
    """Share held out for validation: documents by a stable hash of their names, or the
    text's last val_fraction when that would hold out under half or over twice it."""
    eval_every: int = 50
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 8
    """Batches of fixed validation windows per evaluation (and per domain)."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints, delete older ones."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda; on cuda the forward runs in bf16 autocast."""
    progress: bool = True
    """Show a progress bar."""
    compile: str = "none"
    """torch.compile the training forward: none, default or reduce-overhead (CUDA graphs)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every"):
            check_int(name, getattr(self, name))
        for name in ("eval_batches", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every"):
            check_int(name, getattr(self, name), minimum=0)
        check_seed("seed", self.seed)
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum, "
                f"got grad_accum={self.grad_accum!r}"
            )
        check_range("lr", self.lr, 0.0, 10.0, low_open=True)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0, 10.0)
        # AdamW divides by 1 - beta**t: a beta of 1 is refused by torch at the first step.
        check_range("beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_range("beta2", self.beta2, 0.0, 1.0, high_open=True)
        # 0 disables clipping; a finite bound otherwise (inf would be 0's meaning again).
        check_range("grad_clip", self.grad_clip, 0.0, math.inf, high_open=True)
        check_range("val_fraction", self.val_fraction, 0.0, 0.5, low_open=True)
        for name in ("data", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        check_choice("device", self.device, DEVICES)
        check_bool("progress", self.progress)
        check_choice("compile", self.compile, COMPILE_MODES)

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch (over all ranks)."""
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step."""
        return self.batch_size * self.seq_len

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        values = asdict(self)
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        values.update(changes)
        return TrainConfig(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**data)
