"""The N:M pattern (``core/prune/nm.py``) against a loop reference, and its staircase and parsing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_compress.core.prune.nm import nm_keep_per_group, nm_masks, parse_nm


def _nm_reference(w: Tensor, n: int, m: int) -> Tensor:
    """Loop over groups of the (out, *kernel, in) layout, keeping the n largest of each."""
    flat = w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1) if w.dim() > 2 else w
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for r in range(flat.shape[0]):
        for g in range(0, flat.shape[1], m):
            group = flat[r, g : g + m].abs().tolist()
            order = sorted(range(len(group)), key=lambda i: (-group[i], i))
            for i in order[:n]:
                keep[r, g + i] = True
    if w.dim() > 2:
        keep = keep.reshape(w.shape[0], *w.shape[2:], w.shape[1]).permute(0, w.dim() - 1, *range(1, w.dim() - 1))
    return keep


@pytest.mark.parametrize(
    "shape",
    [(6, 16), (4, 10), (8, 8, 3, 3), (8, 1, 3, 3), (6, 6, 5), (4, 6, 2, 2, 2)],
    ids=["linear", "linear-partial", "conv2d", "depthwise", "conv1d", "conv3d"],
)
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_matches_the_loop_reference(shape: tuple[int, ...], n: int, m: int) -> None:
    w = torch.randn(*shape)
    mask = nm_masks({"w": w}, n, m)["w"]
    assert mask.shape == w.shape
    assert torch.equal(mask, _nm_reference(w, n, m))


def test_nm_pattern_along_input_channels_for_convs() -> None:
    w = torch.randn(4, 8, 3, 3)
    mask = nm_masks({"w": w}, 2, 4)["w"]
    groups = mask.permute(0, 2, 3, 1).reshape(4, 3, 3, 2, 4)  # 4 consecutive input channels
    assert (groups.sum(-1) == 2).all()
    assert (~mask).float().mean() == 0.5


def test_nm_linear_every_group_of_m_has_exactly_n() -> None:
    w = torch.randn(7, 12)
    mask = nm_masks({"w": w}, 2, 4)["w"]
    assert (mask.view(7, 3, 4).sum(-1) == 2).all()


def test_nm_trailing_partial_group_keeps_at_most_n() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    mask = nm_masks({"w": w}, 2, 4)["w"]
    assert mask.int().tolist() == [[0, 0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0]]
    single = nm_masks({"w": torch.tensor([[5.0]])}, 2, 4)["w"]
    assert single.all()


def test_nm_staircase_keep() -> None:
    w = torch.randn(3, 8)
    three = nm_masks({"w": w}, 2, 4, keep=3)["w"]
    assert (three.view(3, 2, 4).sum(-1) == 3).all()
    two = nm_masks({"w": w}, 2, 4, keep=2, previous={"w": three})["w"]
    assert (two.view(3, 2, 4).sum(-1) == 2).all() and not (two & ~three).any()
    assert [nm_keep_per_group(s, 2, 4) for s in (0.0, 0.124, 0.125, 0.375, 0.5)] == [4, 4, 3, 2, 2]
    assert [nm_keep_per_group(s, 1, 8) for s in (0.0, 0.3, 0.875)] == [8, 6, 1]


def test_nm_previous_prunes_stay_pruned_even_with_room() -> None:
    w = torch.ones(1, 4)
    prev = torch.tensor([[True, False, False, False]])
    mask = nm_masks({"w": w}, 2, 4, previous={"w": prev})["w"]
    assert mask.tolist() == [[True, False, False, False]]


def test_parse_nm() -> None:
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 1 : 8 ") == (1, 8)
    assert parse_nm("4:2") == (4, 2)  # parsed; the callback rejects N >= M
    assert parse_nm("2:4:8") is None and parse_nm("magnitude") is None and parse_nm("a:b") is None


def test_masks_still_exports_the_nm_names() -> None:
    from lightning_compress.core.prune import masks

    assert (masks.nm_masks, masks.nm_keep_per_group, masks.parse_nm) == (nm_masks, nm_keep_per_group, parse_nm)
