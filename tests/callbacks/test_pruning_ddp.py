"""PruningCallback under strategy="ddp" on two CPU processes: every rank holds the same masks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp_pruning")
    run_ddp_script("ddp_pruning.py", out, timeout=600)
    return {n: list(load_ranks(out, n)) for n in ("methods", "diverged")}


@pytest.mark.ddp
@pytest.mark.slow
def test_ranks_hold_identical_masks_and_weights(results) -> None:
    a, b = results["methods"]
    # 160 samples / 2 ranks / batch 8 = 10 batches per epoch, accumulate 2: 5 steps; 3 epochs -> window 0-10
    assert a["window"] == b["window"] == [[0, 10]]
    assert a["masks"].keys() == b["masks"].keys() == {"body.0.weight", "body.3.weight", "head.weight"}
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        assert (a["state"][name][~a["masks"][name]] == 0).all(), name
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["sparsity"] == b["sparsity"]
    assert a["sparsity"]["magnitude"] == pytest.approx(0.8, abs=1e-2)  # 96 weights in the head
    assert a["sparsity"]["2:4"] == 0.5 and a["sparsity"]["channel"] == 0.5
    conv = a["state"]["body.0.weight"]
    assert int((conv == 0).flatten(1).all(dim=1).sum()) == 8  # 8 of 16 filters
    hidden = a["state"]["body.3.weight"]
    assert ((hidden != 0).view(32, -1, 4).sum(-1) == 2).all()


@pytest.mark.ddp
@pytest.mark.slow
def test_masks_come_from_rank_zero_even_when_replicas_differ(results) -> None:
    a, b = results["diverged"]
    assert any(not torch.equal(a["state"][k], b["state"][k]) for k in a["state"]), "the noise did not apply"
    assert a["sparsity"]["magnitude"] == b["sparsity"]["magnitude"] == pytest.approx(0.8, abs=1e-4)
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        assert torch.equal(a["state"][name] == 0, b["state"][name] == 0), name  # zeros at the same places
