from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from lightning_compress.core.prune import patterns
from lightning_compress.core.prune.masks import METHODS, channel_masks, compute_masks, nm_masks
from lightning_compress.core.prune.patterns import (
    describe_patterns,
    is_pattern,
    pattern_for,
    pattern_names,
    register_pattern,
    register_pattern_family,
)


def test_builtin_patterns_are_the_table_entries() -> None:
    assert METHODS == ("magnitude", "channel", "N:M")
    assert pattern_names()[:3] == METHODS
    assert describe_patterns()[:2] == ["'magnitude'", "'channel'"]
    assert "'N:M' such as '2:4'" in describe_patterns()
    assert is_pattern("2:4") and is_pattern("1:8") and not is_pattern("2:4:8") and not is_pattern("l1")
    with pytest.raises(ValueError, match="unknown pruning method 'l1'"):
        pattern_for("l1")


def test_patterns_decide_from_scores() -> None:
    w = {"fc": torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.1, 0.2, 0.3, 0.4]])}
    scores = {"fc": w["fc"].abs()}
    assert torch.equal(pattern_for("channel")(scores, 0.5, "layer", None)["fc"], channel_masks(w, 0.5, "layer")["fc"])
    assert torch.equal(pattern_for("2:4")(scores, 0.5, "layer", None)["fc"], nm_masks(w, 2, 4)["fc"])


def _every_other_row(
    scores: Mapping[str, Tensor], sparsity: float, scope: str, previous: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    masks = {}
    for name, s in scores.items():
        keep = torch.ones_like(s, dtype=torch.bool)
        keep[1::2] = False
        masks[name] = keep if previous is None else keep & previous[name]
    return masks


def test_a_user_pattern_is_one_entry() -> None:
    register_pattern("test_rows", _every_other_row)
    got = compute_masks({"fc": torch.ones(4, 2)}, 0.5, method="test_rows")["fc"]
    assert got[:, 0].tolist() == [True, False, True, False]
    assert is_pattern("test_rows") and "'test_rows'" in describe_patterns()
    with pytest.raises(ValueError, match="mask pattern 'test_rows' is registered already"):
        register_pattern("test_rows", _every_other_row)


def test_a_user_family_resolves_its_parameters() -> None:
    def first_k(method: str):  # type: ignore[no-untyped-def]
        if not method.startswith("test_first"):
            return None
        k = int(method.removeprefix("test_first"))

        def pattern(scores, sparsity, scope, previous):  # type: ignore[no-untyped-def]
            return {n: torch.arange(s.numel()).view(s.shape) < k for n, s in scores.items()}

        return pattern

    register_pattern_family("test_firstK", first_k, example="test_first3")
    assert compute_masks({"fc": torch.ones(2, 3)}, 0.0, method="test_first4")["fc"].sum() == 4
    assert "'test_firstK' such as 'test_first3'" in describe_patterns()
    with pytest.raises(ValueError, match="needs a non-empty name"):
        register_pattern("", _every_other_row)


def test_ranking_tools() -> None:
    assert [patterns.prune_count(s, 10) for s in (0.0, 0.25, 0.35, 1.0, -1.0)] == [0, 3, 4, 10, 0]
    tied = torch.tensor([2.0, 1.0, 2.0, 2.0])
    assert patterns.smallest(tied, 2).tolist() == [True, True, False, False]  # tie: lower index
    assert patterns.smallest(torch.tensor([2.0, 1.0]), 0).tolist() == [False, False]
    assert patterns.smallest(torch.tensor([2.0, 1.0]), 5).tolist() == [True, True]
    ranked = patterns.rank_pruned_last(torch.tensor([[-3.0, 1.0]]), torch.tensor([[True, False]]))
    assert ranked.tolist() == [-3.0, float("-inf")]
