"""The error classes moekit adds to the built-in ones, for callers to catch by kind."""

from __future__ import annotations


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


class CheckpointError(ValueError):
    """A checkpoint, moekit's or Hugging Face's, is missing, incomplete or corrupted, or does
    not fit the model or run it is loaded into; the message names the files, tensors or
    fields."""
