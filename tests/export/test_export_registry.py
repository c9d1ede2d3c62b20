"""The exporter registry: one entry per int8 kind of the table, and a clear error for a layer without one."""

from __future__ import annotations

import os

import pytest
import torch
from onnx_helpers import int8
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.core.quant.modules import Int8Linear, Int8Module
from lightning_compress.core.quant.table import INT8_TABLE
from lightning_compress.export.registry import EXPORTERS, UnsupportedLayerError


def test_every_int8_kind_of_the_table_has_an_exporter() -> None:
    assert {kind.name for kind in INT8_TABLE.values()} <= set(EXPORTERS)


class Int8Mystery(Int8Module):
    """An int8 layer type that the table does not know."""

    def __init__(self) -> None:
        super().__init__((4, 4), True, "dynamic", True, static_input=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantize_weight().t()


def test_a_layer_without_exporter_is_named_and_nothing_changes(tmp_path) -> None:
    model = int8(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval())
    model.add_module("odd", Int8Mystery())
    first = model[0]
    with pytest.raises(UnsupportedLayerError, match=r"Cannot export the int8 layer `odd` \(Int8Mystery"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 4))
    assert model[0] is first and isinstance(first, Int8Linear)
    assert os.listdir(tmp_path) == []


def test_a_kind_whose_exporter_is_removed_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.delitem(EXPORTERS, "Int8Conv2d")
    model = int8(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval())
    with pytest.raises(UnsupportedLayerError, match=r"`0` \(Int8Conv2d, kind 'Int8Conv2d'\)"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 6, 6))
