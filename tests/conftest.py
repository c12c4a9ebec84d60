"""Shared test set-up: one CPU thread, a fixed seed per test, GPU tests skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

# Test tensors are tiny and the CI machine's cores are shared by concurrent runs: with more
# than one intra-op thread, small ops spend most of their time waiting on each other (a
# forward of a toy MoE layer measured 2 ms on one thread, 30-60 ms on two under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Every test starts from the same RNG state, so a failure reproduces on its own.
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
