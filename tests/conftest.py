"""Shared fixtures: small, fast and deterministic."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Two cores here and in CI; more threads only add noise to the timings of the trainer tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Every test starts from the same global random state."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def digits():
    """The embedded digits data module with small batches."""
    from lightning_compress.demo import DigitsDataModule

    return DigitsDataModule(batch_size=32)
