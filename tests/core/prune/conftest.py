"""Fixtures of the pruning tests."""

from __future__ import annotations

import pytest

from lightning_compress.core.prune import patterns, scores


@pytest.fixture(autouse=True)
def _own_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patterns and scores a test registers stay in that test (the callback's error messages list the tables)."""
    for module, table in ((patterns, "_PATTERNS"), (patterns, "_FAMILIES"), (scores, "_SCORES")):
        monkeypatch.setattr(module, table, dict(getattr(module, table)))
