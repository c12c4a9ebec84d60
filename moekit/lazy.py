"""computed_once: a property computed on first read and stored, that torch.compile traces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class computed_once(Generic[T]):  # noqa: N801 - a decorator, named like functools' own
    """functools.cached_property without its lock.

    Python 3.11's cached_property takes an RLock, which torch.compile cannot trace: every
    MoE layer's statistics would break the compiled graph (and split its CUDA graphs).
    The first read stores the value in the instance's __dict__, where later reads find it
    before this (non-data) descriptor.
    """

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.compute(obj)
        return value
