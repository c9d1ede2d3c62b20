"""Resuming mid-schedule under ModelParallelStrategy (FSDP2) from sharded and full checkpoints, two CPU ranks.

The script (``tests/scripts/fsdp2_resume.py``) runs in its own process group with a hard timeout. For
each checkpoint kind it trains once without interruption (saving every epoch) and once resumed from
the checkpoint of epoch 0, mid-schedule, with new callbacks and a model built from another seed.
The third kind, ``others``, resumes SparseRegularizer and QuantizeOnFitEnd(qat_epochs=2) from the
sharded checkpoint of epoch 1, in the middle of QAT.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script

KINDS = ("sharded", "full")
PRUNED = {"body.0.weight", "body.4.weight", "head.weight"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("fsdp2_resume")
    run_ddp_script("fsdp2_resume.py", out, timeout=900)  # six fits of two ranks on a loaded 2-core machine
    return {kind: list(load_ranks(out, kind)) for kind in (*KINDS, "others")}


def _same(a: Any, b: Any) -> bool:
    """Equal values, tensors compared exactly, through nested dicts and lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _saved_masks(rank: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {n: m for state in rank["saved"].values() for n, m in state["masks"].items()}


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_the_checkpoint_is_of_its_kind_and_mid_schedule(results, kind: str) -> None:
    for rank in results[kind]:
        assert rank["is_dir"] == (kind == "sharded")  # DCP: a directory; full: one file
        for key, state in rank["saved"].items():
            # 5 steps an epoch, window steps 0-10, an update every 2: the last update before step 5 was at 4
            assert state["version"] == 1 and state["last_update"] == 4, key
            assert 0.0 < state["scheduled_sparsity"] < rank["whole"]["scheduled_sparsity"][key], key
        masks = _saved_masks(rank)
        assert masks.keys() == PRUNED
        for name, mask in masks.items():  # the full masks, not a rank's rows
            assert mask.dtype == torch.bool and mask.device.type == "cpu", name
            assert mask.shape == rank["whole"]["state"][name].shape, name
            assert 0 < int((~mask).sum()) < mask.numel(), name


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_restored_masks_equal_the_saved_ones_on_every_rank(results, kind: str) -> None:
    for rank in results[kind]:
        saved, restored = _saved_masks(rank), rank["restored"]["masks"]
        assert restored.keys() == saved.keys()
        for name in saved:
            assert torch.equal(restored[name], saved[name]), name


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_restore_installs_the_masks_and_the_schedule_position(results, kind: str) -> None:
    for rank in results[kind]:
        restored = rank["restored"]
        for key, state in rank["saved"].items():
            assert restored["last_update"][key] == state["last_update"], key
            assert restored["scheduled_sparsity"][key] == state["scheduled_sparsity"], key
        installed = restored["installed"]
        assert installed.keys() == PRUNED
        for name, mask in _saved_masks(rank).items():
            assert torch.equal(installed[name], mask), name


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_pruned_weights_and_momentum_are_exactly_zero_after_the_restore_and_at_the_end(results, kind: str) -> None:
    for rank in results[kind]:
        for seen in (rank["restored"], rank["resumed"], rank["whole"]):
            assert seen["weight_nonzero"].keys() == PRUNED
            assert set(seen["weight_nonzero"].values()) == {0}
            assert set(seen["momentum_nonzero"].values()) == {0}  # restored with the optimizer state: not None


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_ends_with_the_masks_of_the_uninterrupted_one(results, kind: str) -> None:
    for rank in results[kind]:
        whole, resumed = rank["whole"], rank["resumed"]
        assert resumed["masks"].keys() == whole["masks"].keys() == PRUNED
        for name in PRUNED:
            assert torch.equal(resumed["masks"][name], whole["masks"][name]), name
        assert resumed["scheduled_sparsity"] == whole["scheduled_sparsity"] == {"channel": 0.5, "magnitude": 0.8}
        assert resumed["sparsity"] == whole["sparsity"]


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(results, kind: str) -> None:
    # CPU, data in order, the same seeds: nothing but the restore may differ (as without sharding,
    # tests/callbacks/test_pruning_resume.py).
    for rank in results[kind]:
        whole, resumed = rank["whole"], rank["resumed"]
        assert resumed["state"].keys() == whole["state"].keys()
        for name in whole["state"]:
            assert torch.equal(resumed["state"][name], whole["state"][name]), name
            assert torch.equal(resumed["momentum"][name], whole["momentum"][name]), name


@pytest.mark.ddp
@pytest.mark.parametrize("kind", KINDS)
def test_ranks_agree(results, kind: str) -> None:
    a, b = results[kind]
    for run in ("whole", "resumed"):
        for name in a[run]["state"]:
            assert torch.equal(a[run]["state"][name], b[run]["state"][name]), (run, name)
        for name in PRUNED:
            assert torch.equal(a[run]["masks"][name], b[run]["masks"][name]), (run, name)


@pytest.mark.ddp
def test_regularizer_and_qat_resume_their_state_from_a_sharded_checkpoint(results) -> None:
    for rank in results["others"]:
        saved, restored = rank["saved"], rank["restored"]
        assert saved["regularizer"]["epochs_done"] == 2.0 and saved["regularizer"]["steps"] == 10
        assert saved["quantize"]["qat"], "the checkpoint of epoch 1 is in QAT: observed ranges"
        for key in ("regularizer", "quantize"):
            assert _same(restored[key], saved[key]), key
        whole, resumed = rank["whole"], rank["resumed"]
        assert resumed["states"]["regularizer"] == whole["states"]["regularizer"]
        assert resumed["states"]["regularizer"]["steps"] == 15
        assert resumed["states"]["quantize"]["report"]["layers_converted"] == 4
        assert torch.equal(resumed["output"], whole["output"])  # the same int8 model at fit end
    a, b = results["others"]
    assert torch.equal(a["resumed"]["output"], b["resumed"]["output"])
