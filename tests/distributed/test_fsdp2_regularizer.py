"""SparseRegularizer under ModelParallelStrategy (FSDP2) on two CPU processes: the exact objective on shards."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import load_ranks, run_ddp_script


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    out = tmp_path_factory.mktemp("fsdp2_regularizer")
    run_ddp_script("fsdp2_regularizer.py", out, timeout=300)
    return {fit: load_ranks(out, fit) for fit in ("gradient", "proximal")}


@pytest.mark.ddp
def test_gradient_and_value_are_those_of_the_full_weights(results) -> None:
    for rank in results["gradient"]:
        assert rank["steps"] == 20  # 160 samples / 2 ranks / batch 8 = 10 steps, 2 epochs
        assert rank["grad_error"] < 1e-6  # the added gradient is strength * sign(w) of the full weights
        assert rank["value_error"] < 1e-6  # the logged penalty: local sums all-reduced


@pytest.mark.ddp
def test_proximal_group_lasso_zeroes_whole_rows_alike_on_every_rank(results) -> None:
    a, b = results["proximal"]
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert a["zero_rows"] == b["zero_rows"]
    assert sum(a["zero_rows"].values()) > 0
    for name, rows in a["zero_rows"].items():
        assert rows < a["state"][name].shape[0], name  # not every row
