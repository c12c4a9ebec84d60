"""Field checks shared by the config dataclasses, and argument checks shared by the
modules: each error names the field or argument and the value."""

from __future__ import annotations

import difflib
import math

import torch

SEED_MAX = 2**64 - 1
"""The largest seed torch's generators take."""


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")


def check_seed(name: str, value: object) -> None:
    check_int(name, value, minimum=0, maximum=SEED_MAX)


def check_number(name: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def check_non_negative(name: str, value: object) -> None:
    check_number(name, value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value: object) -> None:
    check_number(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
):
    """low <= value <= high (low < value with low_open, value < high with high_open)."""
    check_number(name, value)
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if not math.isfinite(value) or bad_low or bad_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def did_you_mean(value: str, known: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the known name closest to a misspelt one, else ''.

    The cutoff is high because keys share long prefixes ("moe."): at difflib's default
    0.6, 'moe.nope' would suggest 'moe.top_k'; typos score 0.85 and above.
    """
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_padding_mask(padding_mask: object, shape: tuple[int, ...]) -> None:
    """TypeError / ValueError unless padding_mask is a bool tensor of `shape` (the input's
    shape without its feature dimension)."""
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        kind = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask)
        raise TypeError(f"padding_mask must be a bool tensor (True = padding), got {kind}")
    if padding_mask.shape != shape:
        raise ValueError(
            f"padding_mask must have shape {tuple(shape)}, got {tuple(padding_mask.shape)}"
        )
