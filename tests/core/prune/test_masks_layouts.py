"""Masks of weights stored in another layout: Hugging Face Conv1D ([in, out]) and packed q/k/v projections.

Each mask is compared with a reference computed another way: on the transposed weight, or on the
three projections given as separate layers.
"""

import pytest
import torch

from lightning_compress.core.layout import WeightLayout
from lightning_compress.core.prune.masks import compute_masks

CONV1D = WeightLayout(out_axis=1)

METHODS = [("magnitude", "global"), ("magnitude", "layer"), ("channel", "global"), ("channel", "layer"), ("2:4", "")]


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a Conv1D weight [in=8, out=12] next to an ordinary Linear weight [out=6, in=8]
    return {"c_attn": torch.randn(8, 12, generator=g), "fc": torch.randn(6, 8, generator=g) * 0.7}


@pytest.mark.parametrize(("method", "scope"), METHODS)
def test_conv1d_masks_equal_the_masks_of_the_transposed_weight(method: str, scope: str) -> None:
    weights = _weights()
    got = compute_masks(weights, 0.5, method, scope or "global", layouts={"c_attn": CONV1D})
    reference_weights = {"c_attn": weights["c_attn"].T.contiguous(), "fc": weights["fc"]}
    ref = compute_masks(reference_weights, 0.5, method, scope or "global")
    assert got["c_attn"].shape == weights["c_attn"].shape and got["c_attn"].is_contiguous()
    assert torch.equal(got["c_attn"], ref["c_attn"].T)
    assert torch.equal(got["fc"], ref["fc"])


def test_conv1d_channel_masks_zero_columns_and_nm_groups_run_along_the_input_rows() -> None:
    weights = _weights()
    channel = compute_masks(weights, 0.5, "channel", "layer", layouts={"c_attn": CONV1D})["c_attn"]
    # an output channel of a Conv1D is a column of its [in, out] weight: each column all kept or all pruned
    assert (channel.all(dim=0) | ~channel.any(dim=0)).all()
    assert int((~channel.any(dim=0)).sum()) == 6
    nm = compute_masks(weights, 0.5, "2:4", layouts={"c_attn": CONV1D})["c_attn"]
    # groups of 4 consecutive inputs of each output: 4 rows of one column
    assert (nm.view(2, 4, 12).sum(dim=1) == 2).all()
    assert not (nm.view(8, 3, 4).sum(dim=2) == 2).all()  # not along the stored rows


def _packed(seed: int = 1, embed: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * embed, embed, generator=g)
    w[embed : 2 * embed] *= 0.01  # the key projection is small: one global ranking would drop it all
    return w


@pytest.mark.parametrize(("method", "scope"), METHODS)
def test_packed_in_proj_masks_are_decided_per_projection(method: str, scope: str) -> None:
    w = _packed()
    other = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    layout = WeightLayout(blocks=(8, 8, 8))
    got = compute_masks({"attn": w, "fc": other}, 0.5, method, scope or "global", layouts={"attn": layout})
    q, k, v = w.split(8)
    ref = compute_masks({"q": q, "k": k, "v": v, "fc": other}, 0.5, method, scope or "global")
    assert torch.equal(got["attn"], torch.cat([ref["q"], ref["k"], ref["v"]]))
    assert torch.equal(got["fc"], ref["fc"])
    if method == "channel":  # every projection keeps at least one channel, even the small key block
        assert all(block.any() for block in got["attn"].split(8))


def test_previous_masks_and_statistics_follow_the_layout() -> None:
    weights = _weights()
    layouts = {"c_attn": CONV1D}
    first = compute_masks(weights, 0.3, "channel", "layer", layouts=layouts)
    second = compute_masks(weights, 0.5, "channel", "layer", previous=first, layouts=layouts)
    assert not (second["c_attn"] & ~first["c_attn"]).any()  # monotone in the stored layout
    # wanda: one input norm per input feature, the rows of a Conv1D weight
    norms = {"c_attn": torch.rand(8, generator=torch.Generator().manual_seed(3)), "fc": torch.rand(8)}
    got = compute_masks(weights, 0.5, "2:4", score="wanda", statistics=norms, layouts=layouts)
    transposed = {"c_attn": weights["c_attn"].T.contiguous(), "fc": weights["fc"]}
    ref = compute_masks(transposed, 0.5, "2:4", score="wanda", statistics=norms)
    assert torch.equal(got["c_attn"], ref["c_attn"].T)


def test_standard_layouts_change_nothing() -> None:
    weights = _weights()
    plain = compute_masks(weights, 0.5, "channel")
    same = compute_masks(weights, 0.5, "channel", layouts={"c_attn": WeightLayout(), "fc": None})
    assert all(torch.equal(plain[n], same[n]) for n in weights)
