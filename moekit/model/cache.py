"""The KV cache for incremental decoding.

Shapes: B batch, L cached length (max_seq_len), S new tokens.

What a layer stores is its attention class's choice (keys and values for gqa, the
compressed latent for mla): `LayerCache.update` keeps any named tensors whose dimension
1 is the sequence, in buffers allocated on first use with the tensors' dtype and device.
The model-level `KVCache` owns the position counter and the padding history, so
attention always sees the padding of every cached key.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """One layer's cached tensors, each [B, L, ...] with the sequence in dimension 1."""

    def __init__(self, batch_size: int, max_seq_len: int) -> None:
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.buffers: dict[str, Tensor] = {}

    def update(self, start_pos: int, **new: Tensor) -> tuple[Tensor, ...]:
        """Write each new [B, S, ...] tensor at positions start_pos.. and return, in the
        keyword order given, the cached [B, start_pos + S, ...] tensors."""
        out = []
        for name, t in new.items():
            B, S = t.shape[:2]
            if self.batch_size != B:
                raise ValueError(f"cache holds batch size {self.batch_size}, got {B}")
            if start_pos + S > self.max_seq_len:
                raise ValueError(
                    f"cache holds {self.max_seq_len} positions, got {start_pos + S} "
                    f"(start_pos {start_pos} + {S} new)"
                )
            buf = self.buffers.get(name)
            if buf is None:
                buf = t.new_zeros(B, self.max_seq_len, *t.shape[2:])
                self.buffers[name] = buf
            buf[:, start_pos : start_pos + S] = t
            out.append(buf[:, : start_pos + S])
        return tuple(out)


class KVCache:
    """Per-layer caches plus the number of positions already filled (`pos`)."""

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(
                f"batch_size and max_seq_len must be >= 1, got {batch_size!r}, {max_seq_len!r}"
            )
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.layers = [LayerCache(batch_size, max_seq_len) for _ in range(num_layers)]
        self.pos = 0
        self._padding_BL: Tensor | None = None

    def key_padding(self, padding_BS: Tensor | None, num_new: int) -> Tensor | None:
        """Record the padding of the next num_new positions; return it for every key,
        [B, pos + num_new], or None while no padding was ever given."""
        if padding_BS is None and self._padding_BL is None:
            return None
        if self._padding_BL is None:
            self._padding_BL = torch.zeros(
                self.batch_size, self.max_seq_len, dtype=torch.bool, device=padding_BS.device
            )
        if padding_BS is not None:
            self._padding_BL[:, self.pos : self.pos + num_new] = padding_BS
        return self._padding_BL[:, : self.pos + num_new]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def reset(self) -> None:
        """Forget everything; buffers are kept and overwritten."""
        self.pos = 0
        if self._padding_BL is not None:
            self._padding_BL.zero_()
