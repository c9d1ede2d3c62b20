"""Input statistics for ``score="wanda"``: squared input norms per input feature, checked against references."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.prune.masks import compute_masks
from lightning_compress.core.prune.statistics import InputNormCollector, conv_patch_square_sums
from lightning_compress.core.selection import select_targets


def _collect(model: nn.Module, include: list[str], *inputs: torch.Tensor) -> InputNormCollector:
    collector = InputNormCollector(select_targets(model, include, []))
    collector.install()
    for x in inputs:
        model(x)
    collector.remove()
    return collector


def _row_masks_by_hand(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row keeps its ``(1 - sparsity) * width`` largest scores (no ties in these tests)."""
    rows = score.reshape(score.shape[0], -1)
    k = round(sparsity * rows.shape[1])
    keep = torch.ones_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        for j in sorted(range(rows.shape[1]), key=lambda j: float(rows[r, j]))[:k]:
            keep[r, j] = False
    return keep.view(score.shape)


def test_linear_sums_over_every_leading_dim_and_row_masks_equal_the_hand_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    a, b = torch.randn(2, 5, 4), torch.randn(3, 4)
    collector = _collect(model, ["Linear"], a, b)
    expected = (a.reshape(-1, 4) ** 2).sum(0) + (b**2).sum(0)
    assert torch.allclose(collector.sums["0.weight"], expected)
    assert collector.calls == {"0.weight": 2}
    assert not model[0]._forward_pre_hooks  # removed
    norms = collector.norms()
    weight = model[0].weight.detach()
    masks = compute_masks({"0.weight": weight}, 0.5, scope="row", score="wanda", statistics=norms)
    by_hand = _row_masks_by_hand(weight.abs() * expected.sqrt(), 0.5)
    assert torch.equal(masks["0.weight"], by_hand)
    assert (masks["0.weight"].sum(1) == 2).all()  # every row to the target
    # the activation-aware masks differ from magnitude's here: a large input feature protects its weights
    x = torch.randn(8, 4) * torch.tensor([10.0, 0.1, 0.1, 0.1])
    big = _collect(model, ["Linear"], x).norms()
    wanda = compute_masks({"0.weight": weight}, 0.5, scope="row", score="wanda", statistics=big)["0.weight"]
    assert wanda[:, 0].all()
    assert torch.equal(wanda, _row_masks_by_hand(weight.abs() * (x**2).sum(0).sqrt(), 0.5))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, bias=False),
        nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1), bias=False),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
        nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(3, 2, 3, padding="same", dilation=2, bias=False),
    ],
    ids=["strided", "dilated", "grouped", "reflect", "same"],
)
def test_conv2d_sums_equal_unfold_of_the_padded_input(conv: nn.Conv2d) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, conv.in_channels, 7, 6)
    if conv.padding_mode != "zeros":
        xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        patches = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    elif conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        xp = F.pad(x, [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2])
        patches = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    else:
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    # unfold: (N, C * kh * kw, L), channel-major, the weight's (in, kh, kw) order
    expected = (patches**2).sum((0, 2)).view(conv.in_channels, *conv.kernel_size)
    got = conv_patch_square_sums(conv, x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    collector = _collect(nn.Sequential(conv), ["Conv2d"], x)
    norms = collector.norms()["0.weight"]
    weight = conv.weight.detach()
    if conv.groups == 1:
        assert norms.shape == weight.shape[1:]
        score = weight.abs() * norms
    else:  # each group's rows see their own input channels
        g_in = conv.in_channels // conv.groups
        score = torch.cat(
            [weight[g * 2 : (g + 1) * 2].abs() * expected[g * g_in : (g + 1) * g_in].sqrt() for g in range(2)]
        )
    masks = compute_masks({"w": weight}, 0.5, scope="row", score="wanda", statistics={"w": norms})
    assert torch.equal(masks["w"], _row_masks_by_hand(score, 0.5))


def test_conv1d_and_conv3d_sums_match_the_conv2d_unfold() -> None:
    torch.manual_seed(2)
    c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 9)
    ref = (F.unfold(x.unsqueeze(2), (1, 3), padding=(0, 1), stride=(1, 2)) ** 2).sum((0, 2)).view(2, 3)
    assert torch.allclose(conv_patch_square_sums(c1, x), ref, atol=1e-5)
    c3 = nn.Conv3d(1, 1, (1, 2, 2))
    x3 = torch.randn(1, 1, 1, 3, 3)
    ref3 = (F.unfold(x3[:, :, 0], (2, 2)) ** 2).sum((0, 2)).view(1, 1, 2, 2)
    assert torch.allclose(conv_patch_square_sums(c3, x3), ref3, atol=1e-6)


def test_hf_conv1d_uses_its_true_input_axis() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    layer = Conv1D(6, 4)  # weight [in=4, out=6]
    x = torch.randn(2, 3, 4)
    collector = _collect(nn.Sequential(layer), ["Conv1D"], x)
    expected = (x.reshape(-1, 4) ** 2).sum(0)
    assert torch.allclose(collector.sums["0.weight"], expected)
    target = select_targets(nn.Sequential(layer), ["Conv1D"], [])[0]
    weight = layer.weight.detach()
    masks = compute_masks(
        {"w": weight},
        0.5,
        scope="row",
        score="wanda",
        statistics={"w": collector.norms()["0.weight"]},
        layouts={"w": target.layout},
    )["w"]
    by_hand = _row_masks_by_hand((weight.abs() * expected.sqrt()[:, None]).T, 0.5).T  # rows = outputs = columns
    assert torch.equal(masks, by_hand)
    assert (masks.sum(0) == 2).all()


def test_multihead_attention_blocks_share_the_query_input() -> None:
    torch.manual_seed(4)
    attn = nn.MultiheadAttention(4, 2, batch_first=True)
    x = torch.randn(2, 5, 4)
    collector = InputNormCollector(select_targets(nn.Sequential(attn), ["MultiheadAttention"], []))
    collector.install()
    attn(x, x, x)
    collector.remove()
    assert torch.allclose(collector.sums["0.in_proj_weight"], (x.reshape(-1, 4) ** 2).sum(0))
    assert collector.shape_of("0.in_proj_weight") == (4,)


def test_state_round_trip_and_unseen_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    collector = InputNormCollector(select_targets(model, ["Linear"], []))
    collector.install()
    model[0](torch.ones(1, 2))  # only the first layer is called
    collector.remove()
    assert collector.unseen == ["1.weight"]
    state = collector.state()
    other = InputNormCollector(select_targets(model, ["Linear"], []))
    other.load_state(state)
    assert torch.equal(other.sums["0.weight"], collector.sums["0.weight"]) and other.calls == {"0.weight": 1}
    collector.reset()
    assert not collector.seen
