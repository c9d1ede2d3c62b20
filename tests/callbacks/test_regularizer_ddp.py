"""SparseRegularizer under ``strategy="ddp"`` on two CPU processes (see tests/scripts/ddp_regularizer.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_agree_and_match_the_penalty_added_by_hand(tmp_path):
    result = run_ddp_script("ddp_regularizer.py", tmp_path)
    assert "sync_dist=True" not in result.stderr  # the penalty is the same on every rank: nothing to sync

    for name in ("callback", "hand", "proximal"):
        rank0, rank1 = load_ranks(tmp_path, name)
        assert rank0.keys() == rank1.keys()
        for key in rank0:
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=f"{name}: {key}")

    # The callback's objective under DDP is the hand-written one (penalty gradients added after the
    # all-reduce equal the all-reduced gradients of the penalty in every rank's loss).
    callback, hand = load_ranks(tmp_path, "callback")[0], load_ranks(tmp_path, "hand")[0]
    for key in hand:
        torch.testing.assert_close(callback[key], hand[key], rtol=0, atol=1e-6, msg=key)

    # The proximal group-lasso step zeroed whole channels, the same ones on both ranks (checked above).
    first = load_ranks(tmp_path, "proximal")[0]["body.0.weight"]
    zero_rows = (first == 0).all(dim=1)
    assert 0 < int(zero_rows.sum()) < len(first)
    assert ((first == 0).any(dim=1) == zero_rows).all()
