"""A channel-removed (slim) model exports with export_onnx and runs in ONNX Runtime with equal outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from onnx_helpers import int8, rel_err, run_onnx, top1
from torch import Tensor, nn

from lightning_compress import remove_channels
from lightning_compress.core.prune.groups import find_groups
from lightning_compress.demo import MLP, SmallCNN
from lightning_compress.export import export_onnx

pytest.importorskip("onnxruntime")


def _slim(model: nn.Module, x: Tensor) -> nn.Module:
    """``model`` with every other unit of each coupled group zeroed (weights, bias, norm entries), then removed."""
    model.eval()
    with torch.no_grad():
        for group in find_groups(model, x).groups:
            for unit in group.units[::2]:
                for cut in unit.cuts:
                    t = getattr(model.get_submodule(cut.module), cut.tensor, None)
                    if cut.axis == 0 and isinstance(t, Tensor) and not cut.tensor.startswith("running"):
                        t.index_fill_(0, torch.tensor(cut.indices), 0.0)
        assert remove_channels(model, x)
    return model


@pytest.mark.parametrize("build", [SmallCNN, MLP], ids=["cnn", "mlp"])
def test_slim_float_model_runs_in_onnx_runtime(tmp_path: Path, build: type[nn.Module]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    model = _slim(build(), x)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build().parameters())
    export_onnx(model, tmp_path / "slim.onnx", x)
    (got,) = run_onnx(tmp_path / "slim.onnx", x)
    with torch.no_grad():
        want = model(x)
    assert got.shape == tuple(want.shape)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_slim_int8_model_runs_in_onnx_runtime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8)
    model = int8(_slim(MLP(), x))
    assert model.net[1].out_features == 150
    export_onnx(model, tmp_path / "slim_int8.onnx", x)  # "auto" storage: no int16 saturation on AVX2-only CPUs
    (got,) = run_onnx(tmp_path / "slim_int8.onnx", x)
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want) <= 0.02  # the tolerance of the int8 export tests (test_export_onnx.py)
    assert top1(got, want) >= 0.9


@pytest.mark.slow
def test_slim_resnet18_runs_in_onnx_runtime(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = _slim(tv.models.resnet18(num_classes=10), x)
    export_onnx(model, tmp_path / "slim_resnet18.onnx", x)
    (got,) = run_onnx(tmp_path / "slim_resnet18.onnx", x)
    with torch.no_grad():
        want = model(x)
    assert float((torch.from_numpy(got) - want).norm() / want.norm()) <= 1e-5
