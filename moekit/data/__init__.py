"""Data: the embedded corpus, tokenizers, token files on disk and batches of windows."""

from moekit.data.batches import TrainBatches, val_batches
from moekit.data.corpus import Document, embedded_corpus
from moekit.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from moekit.data.tokens import TokenSplit, prepare_tokens

__all__ = [
    "ByteTokenizer",
    "Document",
    "HFTokenizer",
    "TokenSplit",
    "TrainBatches",
    "embedded_corpus",
    "load_tokenizer",
    "prepare_tokens",
    "val_batches",
]
