"""PruningCallback under ModelParallelStrategy (FSDP2, DTensor weights) on two CPU processes with gloo.

The script (``tests/scripts/fsdp2_pruning.py``) runs in its own process group with a hard timeout, so
a hang (the 0.1 behaviour: both ranks blocked in a collective only rank 0 called) fails the test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script

FITS = ("global", "layer")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp2_pruning")
    run_ddp_script("fsdp2_pruning.py", out, timeout=300)  # seconds on a loaded 2-core machine; a hang is killed
    return {fit: list(load_ranks(out, fit)) for fit in FITS}


@pytest.mark.ddp
@pytest.mark.parametrize("fit", FITS)
def test_weights_are_row_sharded_dtensors(results, fit: str) -> None:
    a, b = results[fit]
    assert all(a["dtensor"].values()) and all(b["dtensor"].values())
    assert a["local_rows"]["body.0.weight"] == 17 and b["local_rows"]["body.0.weight"] == 16  # uneven: 33 rows
    assert a["local_rows"]["head.weight"] == 2 and b["local_rows"]["head.weight"] == 1


@pytest.mark.ddp
@pytest.mark.parametrize("fit", FITS)
def test_every_update_equals_compute_masks_on_the_full_weights(results, fit: str) -> None:
    for rank in results[fit]:
        # 160 samples / 2 ranks / batch 8 = 10 steps an epoch, 3 epochs, window 0-15, an update every 2
        assert rank["checked"] >= 2 * 7, rank["checked"]
        assert rank["mismatch"] == []


@pytest.mark.ddp
@pytest.mark.parametrize("fit", FITS)
def test_ranks_hold_the_same_full_masks_and_weights(results, fit: str) -> None:
    a, b = results[fit]
    assert (
        a["masks"].keys()
        == b["masks"].keys()
        == {f"{m}.weight" for m in ("body.0", "body.2", "body.4", "body.6", "head")}
    )
    for name, mask in a["masks"].items():
        assert mask.dtype == torch.bool and mask.device.type == "cpu"
        assert mask.shape == a["state"][name].shape
        assert torch.equal(mask, b["masks"][name]), name
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["sparsity"] == b["sparsity"]


@pytest.mark.ddp
@pytest.mark.parametrize("fit", FITS)
def test_pruned_weights_and_momentum_are_exactly_zero(results, fit: str) -> None:
    for rank in results[fit]:
        assert set(rank["weight_nonzero"].values()) == {0}
        assert set(rank["momentum_nonzero"].values()) == {0}


@pytest.mark.ddp
def test_methods_reach_their_targets_globally(results) -> None:
    a, _ = results["global"]
    masks = a["masks"]
    assert a["sparsity"]["magnitude"] == pytest.approx(0.8, abs=1e-2)  # one threshold over body.6 and head
    head_and_l4 = torch.cat([masks["body.6.weight"].flatten(), masks["head.weight"].flatten()])
    assert int((~head_and_l4).sum()) == round(0.8 * head_and_l4.numel())
    assert ((masks["body.4.weight"][:, :28].reshape(24, -1, 4).sum(-1)) == 2).all()  # 2:4 over 31 inputs
    for name in ("body.0.weight", "body.2.weight"):  # whole rows
        rows = masks[name]
        assert torch.equal(rows, rows[:, :1].expand_as(rows))
    assert a["sparsity"]["channel"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.ddp
def test_layer_scope_prunes_each_layer_to_the_target(results) -> None:
    a, _ = results["layer"]
    for name in ("body.4.weight", "body.6.weight", "head.weight"):
        mask = a["masks"][name]
        assert int((~mask).sum()) == round(0.7 * mask.numel()), name
    for name, pruned_rows in (("body.0.weight", 17), ("body.2.weight", 16)):  # round half up of 0.5 * 33, 0.5 * 31
        assert int((~a["masks"][name][:, 0]).sum()) == pruned_rows, name


@pytest.mark.ddp
@pytest.mark.parametrize("fit", FITS)
def test_callback_state_holds_the_full_masks(results, fit: str) -> None:
    a, _ = results[fit]
    state_masks = {n: m for masks in a["state_masks"].values() for n, m in masks.items()}
    assert state_masks.keys() == a["masks"].keys()
    for name, mask in state_masks.items():
        assert mask.dtype == torch.bool and mask.device.type == "cpu" and torch.equal(mask, a["masks"][name])
