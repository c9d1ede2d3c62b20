"""core/sharding.py without launching processes: the radix select alone, and a one-rank gloo group in-process.

The two-rank behaviour (uneven shards, ties across ranks) is tested in ``tests/distributed/``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from helpers import one_rank_gloo_group
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.core.prune.masks import compute_masks
from lightning_compress.core.sharding import (
    _row_counts,
    count_nonzero,
    distributed_kth_smallest,
    full_tensor,
    has_dtensors,
    is_dtensor,
    local_rows,
    local_tensor,
    nonfinite,
    row_shardable,
    sharded_masks,
)


@pytest.mark.parametrize("k", [1, 2, 5, 17, 37])
def test_kth_smallest_matches_kthvalue_with_ties_negatives_and_infinity(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    values = torch.cat([torch.randn(30, generator=g), torch.tensor([0.0, -0.0, 0.5, 0.5, -math.inf, 1e-30, -2.5])])
    values = values[torch.randperm(values.numel(), generator=g)]
    got = distributed_kth_smallest(values, k)
    assert got == float(torch.kthvalue(values, k).values)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50), st.data())
def test_kth_smallest_is_exact_for_any_float32(values: list[float], data: st.DataObject) -> None:
    tensor = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(1, len(values)))
    expected = float(torch.sort(tensor).values[k - 1])
    got = distributed_kth_smallest(tensor, k)
    assert got == expected  # -0.0 == 0.0: the sign of a zero is not a distinct value here


def test_kth_smallest_refuses_k_past_the_end() -> None:
    with pytest.raises(ValueError, match="larger than the number of values"):
        distributed_kth_smallest(torch.tensor([1.0, 2.0]), 3)


def test_row_counts_are_torch_chunk_sizes() -> None:
    assert _row_counts(33, 2) == [17, 16]
    assert _row_counts(3, 2) == [2, 1]
    assert _row_counts(2, 4) == [1, 1, 0, 0]  # chunk gives fewer pieces than ranks


def test_plain_tensors_pass_through() -> None:
    w = torch.randn(4, 3)
    assert not is_dtensor(w) and not has_dtensors([w]) and not row_shardable(w)
    assert local_tensor(w) is w and torch.equal(full_tensor(w), w) and local_rows(w, w) is w


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    """A gloo process group of one rank in this process (DTensors on a 1-rank mesh)."""
    with one_rank_gloo_group():
        yield


def _dtensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    return {n: distribute_tensor(w.clone(), mesh, [Shard(0)]) for n, w in weights.items()}


@pytest.mark.parametrize("method", ["magnitude", "channel", "2:4"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sharded_masks_equal_compute_masks(one_rank_group: None, method: str, scope: str) -> None:
    g = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(7, 8, generator=g), "b": torch.randn(5, 12, generator=g).round(decimals=1)}  # ties
    previous = compute_masks(weights, 0.25, method, scope)
    expected = compute_masks(weights, 0.5, method, scope, previous=previous)
    sharded = _dtensors(weights)
    assert has_dtensors(sharded.values()) and all(row_shardable(w) for w in sharded.values())
    local, full = sharded_masks(sharded, 0.5, method, scope, previous)
    for name in weights:
        assert torch.equal(full[name], expected[name]), name
        assert torch.equal(local[name], expected[name]), name  # one rank: its rows are all rows


def test_sharded_masks_fall_back_to_full_weights_for_other_scores(one_rank_group: None) -> None:
    weights = {"a": torch.randn(6, 4)}
    stats = {"a": torch.rand(4) + 0.5}
    expected = compute_masks(weights, 0.5, score="wanda", statistics=stats)
    _, full = sharded_masks(_dtensors(weights), 0.5, score="wanda", statistics=stats)
    assert torch.equal(full["a"], expected["a"])


def test_counts_and_nonfinite_over_shards(one_rank_group: None) -> None:
    w = _dtensors({"a": torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([[math.nan, 1.0]])})
    assert count_nonzero([w["a"]]) == (2, 6)
    assert nonfinite(w) == ["b"]
    assert torch.equal(full_tensor(w["a"]), torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]))
