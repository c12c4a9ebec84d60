"""The one error class moekit adds to ValueError/TypeError, for callers to catch by kind."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint, moekit's or Hugging Face's, is missing, incomplete or corrupted, or does
    not fit the model or run it is loaded into; the message names the files, tensors or
    fields."""
