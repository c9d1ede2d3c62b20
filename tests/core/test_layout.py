import pytest
import torch

from lightning_compress.core.layout import (
    STANDARD,
    LayoutPlan,
    WeightLayout,
    canonical_blocks,
    from_canonical_blocks,
    out_first,
)


def test_canonical_blocks_are_views_and_join_back() -> None:
    w = torch.randn(12, 4)
    layout = WeightLayout(blocks=(4, 4, 4))
    blocks = canonical_blocks(w, layout)
    assert [b.data_ptr() for b in blocks] == [w[i * 4 :].data_ptr() for i in range(3)]  # views, no copies
    assert torch.equal(from_canonical_blocks(blocks, layout), w)
    conv1d = torch.randn(3, 5)  # [in, out]
    (view,) = canonical_blocks(conv1d, WeightLayout(out_axis=1))
    assert torch.equal(view, conv1d.T) and view.data_ptr() == conv1d.data_ptr()
    assert out_first(w, STANDARD) is w


def test_blocks_must_cover_the_output_axis() -> None:
    with pytest.raises(ValueError, match=r"blocks \(4, 4\) do not add up to the 12 output channels"):
        canonical_blocks(torch.randn(12, 4), WeightLayout(blocks=(4, 4)))


def test_plan_splits_joins_and_passes_standard_dicts_through() -> None:
    weights = {"a": torch.randn(6, 2), "b": torch.randn(2, 3)}
    identity = LayoutPlan(weights, {"a": STANDARD})
    assert identity.is_identity and identity.split(weights) is weights
    plan = LayoutPlan(weights, {"a": WeightLayout(blocks=(2, 2, 2)), "b": WeightLayout(out_axis=1)})
    pieces = plan.split(weights)
    assert [tuple(p.shape) for p in pieces.values()] == [(2, 2), (2, 2), (2, 2), (3, 2)]
    joined = plan.join(pieces)
    assert list(joined) == ["a", "b"] and all(torch.equal(joined[n], weights[n]) for n in weights)
    stats = plan.repeat({"a": torch.ones(2), "b": torch.ones(2)})
    assert len(stats) == 4
