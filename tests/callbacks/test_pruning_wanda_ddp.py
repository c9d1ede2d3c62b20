"""PruningCallback(score="wanda") under strategy="ddp": the statistics are summed over the ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.mark.ddp
@pytest.mark.slow
def test_wanda_statistics_are_all_reduced_and_masks_equal(tmp_path) -> None:
    run_ddp_script("ddp_pruning_wanda.py", tmp_path, timeout=300)
    a, b = load_ranks(tmp_path, "wanda")
    assert a["window"] == b["window"] == [0, 8]  # 4 steps per epoch, target at the end of epoch 1
    steps = [s for s, _, _ in a["updates"]]
    assert steps == [s for s, _, _ in b["updates"]] == [0, 3, 6, 8]
    for (_, _, used_a), (_, _, used_b) in zip(a["updates"], b["updates"], strict=True):
        assert torch.equal(used_a, used_b)  # every rank uses the same norms
    for (step, local_a, used_a), (_, local_b, _) in zip(a["updates"][1:], b["updates"][1:], strict=True):
        assert not torch.equal(local_a, local_b), step  # each rank saw its own half of the data
        assert torch.allclose(used_a, (local_a + local_b).sqrt()), step  # the norm of the summed squares
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name])
        assert (a["masks"][name].sum(1) == a["masks"][name].shape[1] // 2).all()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
