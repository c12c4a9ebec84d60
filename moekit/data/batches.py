"""Batches of token windows: seeded random offsets for training, fixed windows for validation.

Shapes: B batch (sequences), S sequence length.

A training batch is a pure function of (seed, step): resuming at step n draws exactly the
windows an uninterrupted run would have drawn, with no sampler state to save. The batch is
always the *global* batch; data-parallel ranks keep their own rows of it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from moekit.data.tokens import TokenSplit
from moekit.validate import check_int


def _check_length(split: TokenSplit, seq_len: int, name: str) -> None:
    check_int("seq_len", seq_len)  # 0 made empty windows
    if split.num_tokens < seq_len + 1:
        # Validation takes whole documents (moekit.data.tokens): a few files split lumpily.
        more = ", a larger val_fraction" if name == "validation" else ""
        raise ValueError(
            f"the {name} split has {split.num_tokens} tokens, shorter than the context: "
            f"it needs at least seq_len + 1 = {seq_len + 1} (use more text{more} or a "
            "smaller seq_len)"
        )


def _windows(tokens: Tensor, offsets: list[int], seq_len: int) -> tuple[Tensor, Tensor]:
    rows = torch.stack([tokens[o : o + seq_len + 1] for o in offsets]).long()
    return rows[:, :-1], rows[:, 1:]


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed fixed by (seed, step), well mixed so nearby steps differ."""
    digest = hashlib.sha1(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class TrainBatches:
    """Random windows of S+1 tokens from the training split: `batches(step) -> (x, y)`."""

    def __init__(self, split: TokenSplit, seq_len: int, batch_size: int, seed: int) -> None:
        _check_length(split, seq_len, "train")
        self.tokens = split.tokens()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def __call__(self, step: int) -> tuple[Tensor, Tensor]:
        """Inputs x_BS and next-token targets y_BS (int64) of the global batch at `step`."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        high = self.tokens.numel() - self.seq_len
        offsets = torch.randint(0, high, (self.batch_size,), generator=gen).tolist()
        return _windows(self.tokens, offsets, self.seq_len)


def val_batches(
    split: TokenSplit, seq_len: int, batch_size: int, num_batches: int, domain: str | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Fixed, evenly spaced validation windows (no randomness): the same every evaluation.

    With `domain`, windows lie wholly inside that domain's documents (per-domain loss);
    returns an empty list when the domain has no run of S+1 tokens.
    """
    if domain is None:
        _check_length(split, seq_len, "validation")
        ranges = [(0, split.num_tokens)]
    else:
        ranges = [(s, e) for d, s, e in split.domains if d == domain and e - s > seq_len]
        if not ranges:
            return []
    starts = []  # every admissible window start, as (range start, count) pairs
    for s, e in ranges:
        starts.append((s, e - seq_len))
    total = sum(e - s for s, e in starts)
    count = min(batch_size * num_batches, total)
    offsets = []
    for i in range(count):
        pos = (i * total) // count
        for s, e in starts:
            if pos < e - s:
                offsets.append(s + pos)
                break
            pos -= e - s
    tokens = split.tokens()
    return [
        _windows(tokens, offsets[i : i + batch_size], seq_len)
        for i in range(0, len(offsets), batch_size)
    ]
