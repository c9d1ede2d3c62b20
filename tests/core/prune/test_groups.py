"""find_groups: coupled channel groups from one torch.fx trace."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_compress.core.prune.groups import find_groups


def _group_of(groups, module: str):  # type: ignore[no-untyped-def]
    return next(g for g in groups if module in g.modules or g.name == module)


def test_residual_convolutions_share_one_group() -> None:
    tv = pytest.importorskip("torchvision")
    groups = find_groups(tv.models.resnet18(), torch.randn(1, 3, 32, 32)).groups
    stem = _group_of(groups, "conv1")
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stem.modules)
    assert len(stem.units) == 64 and stem.removable
    assert not _group_of(groups, "fc").removable  # the model output


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.cat([self.a(x), self.b(x).relu()], dim=1))


def test_concatenation_offsets() -> None:
    groups = find_groups(_Concat(), torch.randn(1, 3, 4, 4)).groups
    b = _group_of(groups, "b")
    consumers = [c for u in b.units for c in u.consumers]
    assert [c.indices for c in consumers] == [(4,), (5,)]


def test_depthwise_joins_its_producer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 2, 1))
    group = _group_of(find_groups(model, torch.randn(1, 3, 5, 5)).groups, "0")
    assert set(group.modules) == {"0", "2"}
    assert {c.module for c in group.units[0].cuts} == {"0", "1", "2", "3"}


def test_layernorm_blocks_its_channels() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    group = _group_of(find_groups(model, torch.randn(2, 4)).groups, "0")
    assert not group.removable and not group.units


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.tail = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent Python: the root does not trace
            x = x * 2
        return self.tail(self.body(x))


def test_untraceable_root_falls_back_to_children() -> None:
    result = find_groups(_Untraceable(), torch.randn(2, 4))
    assert "_Untraceable" in result.errors
    assert _group_of(result.groups, "body.0").removable  # traced on its own
    assert result.untraced == []  # every layer is in some traced child


def test_attention_heads_are_units() -> None:
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    groups = find_groups(layer, torch.randn(2, 3, 16)).groups
    heads = _group_of(groups, "self_attn")
    assert heads.kind == "head" and len(heads.units) == 4
    assert len([g for g in groups if g.kind == "head"]) == 1
