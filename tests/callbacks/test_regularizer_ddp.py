"""SparseRegularizer under ``strategy="ddp"`` on two CPU processes (see tests/scripts/ddp_regularizer.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_regularizer.py"


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_agree_and_match_the_penalty_added_by_hand(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sync_dist=True" not in result.stderr  # the penalty is the same on every rank: nothing to sync

    def load(name: str, rank: int) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=True)

    for name in ("callback", "hand", "proximal"):
        rank0, rank1 = load(name, 0), load(name, 1)
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"{name}: {key}")

    # The callback's objective under DDP is the hand-written one (penalty gradients added after the
    # all-reduce equal the all-reduced gradients of the penalty in every rank's loss).
    callback, hand = load("callback", 0), load("hand", 0)
    for key in hand:
        torch.testing.assert_close(callback[key], hand[key], rtol=0, atol=1e-6, msg=key)

    # The proximal group-lasso step zeroed whole channels, the same ones on both ranks (checked above).
    first = load("proximal", 0)["body.0.weight"]
    zero_rows = (first == 0).all(dim=1)
    assert 0 < int(zero_rows.sum()) < len(first)
    assert ((first == 0).any(dim=1) == zero_rows).all()
