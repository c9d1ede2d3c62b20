"""Shared fixtures: small, fast and deterministic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

# Tiny models on shared cores: one intra-op thread is faster (no waiting for a second thread that
# another process holds) and makes the float results independent of the machine's core count.
torch.set_num_threads(1)


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
