"""Tokenizers: raw UTF-8 bytes by default (nothing to train), or a `tokenizer.json`.

V is the vocabulary size. `load_tokenizer("bytes")` or `load_tokenizer("path/tokenizer.json")`.
"""

from __future__ import annotations

from pathlib import Path

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256, lossless, needs no training or files."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A sampled byte sequence need not be valid UTF-8; show the damage, don't raise.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


class HFTokenizer:
    """A Hugging Face `tokenizers` model loaded from a `tokenizer.json` file."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                "a tokenizer.json needs the `tokenizers` package: pip install 'moekit[tokenizers]'"
            ) from err
        self._tok = Tokenizer.from_file(str(path))
        self.name = str(path.resolve())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.int64)


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """ "bytes" for the byte tokenizer, else a path to a `tokenizer.json`."""
    if spec == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest unsigned dtype that holds every token id (for the token file)."""
    if vocab_size <= 2**8:
        return torch.uint8
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.uint32
