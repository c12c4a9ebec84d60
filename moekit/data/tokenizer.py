"""Tokenizers: raw UTF-8 bytes by default (nothing to train), or a `tokenizer.json`.

V is the vocabulary size. `load_tokenizer("bytes")` or `load_tokenizer("path/tokenizer.json")`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from moekit.errors import MissingDependency


class ByteTokenizer:
    """UTF-8 bytes as tokens: V = 256, lossless, needs no training or files."""

    name = "bytes"
    fingerprint = "bytes"
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes; there are no special tokens to add."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        # A sampled byte sequence need not be valid UTF-8, and a model wider than 256 ids
        # may sample ids that are no byte: show the damage (U+FFFD), don't raise.
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            parts += [run.decode("utf-8", errors="replace"), "\ufffd"]
            run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    @staticmethod
    def tokenizer_json() -> dict:
        """This tokenizer as a Hugging Face `tokenizer.json`: token id = byte value.

        A byte-level BPE without merges. The ByteLevel pre-tokenizer (no regex split, no
        prefix space) turns each byte into one printable character, GPT-2's
        bytes-to-unicode map, which the vocabulary maps back to the byte's value; the
        ByteLevel decoder undoes it. So a Hugging Face directory exported from a byte-level
        run is read by `tokenizers` and transformers exactly as moekit reads it.
        """
        byte_level = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": False,
            "use_regex": False,
        }
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": None,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "vocab": {char: byte for byte, char in enumerate(_byte_chars())},
                "merges": [],
            },
        }


def _byte_chars() -> list[str]:
    """GPT-2's bytes-to-unicode map: printable Latin-1 bytes stand for themselves, the
    others for the code points from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


class HFTokenizer:
    """A Hugging Face `tokenizers` model loaded from a `tokenizer.json` file."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise MissingDependency(
                "a tokenizer.json needs the `tokenizers` package: pip install 'moekit[tokenizers]'"
            ) from err
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(
                f"tokenizer file {path} is not a valid tokenizer.json: {err}"
            ) from None
        self.name = str(path.resolve())
        # What the token cache's key hashes: edits to the file must rebuild the cache.
        self.fingerprint = hashlib.sha1(path.read_bytes()).hexdigest()
        # The largest id + 1, not the number of tokens: a vocabulary may leave ids unused,
        # and every id must fit the model's embedding and the token file's dtype.
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; add_special_tokens applies the file's post-processor (a BOS
        for Mixtral or DeepSeek), as transformers' tokenizer(text) does for a prompt.
        Training text is encoded without: documents are streamed back to back."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

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


def absolute_tokenizer(spec: str) -> str:
    """`spec` with a tokenizer.json path made absolute ("bytes" unchanged): a run records
    it, and sampling, analysis and --resume may run from another working directory."""
    return spec if spec == "bytes" else str(Path(spec).resolve())


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest unsigned dtype that holds every token id (for the token file)."""
    if vocab_size <= 2**8:
        return torch.uint8
    if vocab_size <= 2**16:
        return torch.uint16
    return torch.uint32
