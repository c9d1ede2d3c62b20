"""export_onnx on Linear / Conv2d models: float, pruned, every int8 mode; inputs, batch, files, errors."""

from __future__ import annotations

import builtins
import os

import onnx
import pytest
import torch
from onnx_helpers import int8, rel_err, run_onnx, top1
from torch import nn

from lightning_compress import CompressionConfigError, export_onnx
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear

MODES = ["dynamic", "static", "weight_only"]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # grouped
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),  # depthwise
        nn.Conv2d(16, 8, 3, padding=1, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_float_mlp_matches_and_batch_is_dynamic(check_export) -> None:
    model = mlp()
    got, want, path = check_export(model, torch.randn(4, 64), torch.randn(13, 64))
    assert got.shape == (13, 10)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_pruned_mlp_keeps_exact_zeros(check_export) -> None:
    model = mlp()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight[layer.weight.abs() < layer.weight.abs().median()] = 0.0
    got, want, path = check_export(model, torch.randn(4, 64), torch.randn(9, 64))
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    zeros = sum(int((w == 0).sum()) for w in weights.values() if w.ndim == 2)
    assert zeros >= sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weight_dtype", ["auto", "int8", "uint8"])
def test_int8_mlp_every_mode(check_export, mode: str, per_channel: bool, weight_dtype: str) -> None:
    torch.manual_seed(1)
    calib = torch.randn(256, 64)
    model = int8(mlp(), mode, per_channel, calib)
    got, want, path = check_export(model, calib[:8], torch.randn(200, 64), weight_dtype=weight_dtype)
    assert got.shape == (200, 10)
    if weight_dtype != "int8":  # "int8" storage saturates on AVX2-only CPUs (see export/_cpu.py)
        assert rel_err(got, want) <= 0.02
        assert top1(got, want) >= 0.98
    proto = onnx.load(str(path))
    stored = [
        i
        for i in proto.graph.initializer
        if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) == 2
    ]
    assert sum(onnx.numpy_helper.to_array(i).size for i in stored) == 64 * 96 + 96 * 48 + 48 * 10
    assert not [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    ops = {n.op_type for n in proto.graph.node}
    expected = {"dynamic": "DynamicQuantizeLinear", "static": "QuantizeLinear", "weight_only": "DequantizeLinear"}
    assert expected[mode] in ops


def test_int8_file_is_a_quarter_of_the_float_file(tmp_path) -> None:
    big = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    export_onnx(big, tmp_path / "f.onnx", torch.randn(2, 256))
    export_onnx(int8(big), tmp_path / "q.onnx", torch.randn(2, 256))
    ratio = os.path.getsize(tmp_path / "q.onnx") / os.path.getsize(tmp_path / "f.onnx")
    assert 0.24 < ratio < 0.27


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("mode", MODES)
def test_int8_conv_grouped_depthwise(check_export, mode: str, per_channel: bool) -> None:
    calib = torch.randn(16, 3, 12, 12)
    model = int8(convnet(), mode, per_channel, calib)
    assert sum(isinstance(m, Int8Conv2d) for m in model.modules()) == 4
    got, want, _ = check_export(model, calib[:2], torch.randn(5, 3, 12, 12))
    assert got.shape == (5, 10)
    assert rel_err(got, want) <= 0.02


def test_float_conv(check_export) -> None:
    got, want, _ = check_export(convnet(), torch.randn(2, 3, 12, 12), torch.randn(3, 3, 12, 12))
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5, rtol=1e-4)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * self.b(y)


def test_tuple_and_dict_inputs(check_export) -> None:
    model = int8(TwoInputs().eval())
    x, y = torch.randn(3, 16), torch.randn(3, 4)
    got, want, path = check_export(model, (x[:2], y[:2]), (x, y), name="tuple.onnx")
    assert rel_err(got, want) <= 0.02
    got, want, path = check_export(model, {"x": x[:2], "y": y[:2]}, {"x": x, "y": y}, name="dict.onnx")
    assert rel_err(got, want) <= 0.02
    session_inputs = [i.name for i in onnx.load(str(path)).graph.input]
    assert session_inputs == ["x", "y"]


def test_model_is_left_exactly_as_it_was(tmp_path) -> None:
    model = int8(mlp(), "static", True, torch.randn(32, 64)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64))
    assert [type(m) for m in model.modules()] == types
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert isinstance(model[0], Int8Linear)


def test_model_is_restored_when_the_export_fails(tmp_path) -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                return self.fc(x)
            return x

    model = int8(Bad())
    layer = model.fc
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.export raises
        export_onnx(model, tmp_path / "bad.onnx", torch.randn(2, 4))
    assert model.fc is layer
    assert not (tmp_path / "bad.onnx").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    import lightning_compress.export.onnx as exporter

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(exporter, "onnx_bytes", lambda *a, **k: b"new")
    monkeypatch.setattr(exporter, "atomic_write", exporter.atomic_write)
    exporter.export_onnx(mlp(), path, torch.randn(2, 64))
    assert path.read_bytes() == b"new"

    def half_write(target, write):
        from lightning_compress.core.files import atomic_write

        def failing(f):
            f.write(b"half")
            broken()

        atomic_write(target, failing)

    monkeypatch.setattr(exporter, "atomic_write", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        exporter.export_onnx(mlp(), path, torch.randn(2, 64))
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_bad_arguments(tmp_path) -> None:
    model = mlp()
    with pytest.raises(CompressionConfigError, match="Expected argument `path` to be a file path, not a folder"):
        export_onnx(model, tmp_path, torch.randn(2, 64))
    with pytest.raises(CompressionConfigError, match="Expected argument `path`"):
        export_onnx(model, "", torch.randn(2, 64))
    with pytest.raises(CompressionConfigError, match="Expected argument `example_inputs` to be a tensor"):
        export_onnx(model, tmp_path / "m.onnx", 3)
    with pytest.raises(CompressionConfigError, match="a batch of at least 2"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 64))
    with pytest.raises(CompressionConfigError, match="share their first"):
        export_onnx(TwoInputs(), tmp_path / "m.onnx", (torch.randn(2, 16), torch.randn(3, 4)))
    with pytest.raises(CompressionConfigError, match="Expected argument `weight_dtype` to be one of 'auto', 'int8'"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64), weight_dtype="int4")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_missing_extra_names_it(tmp_path, monkeypatch, missing: str) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda name, package=None: fake_import(name))
    with pytest.raises(ImportError, match=r'pip install "lightning-compress\[export\]"'):
        export_onnx(mlp(), tmp_path / "m.onnx", torch.randn(2, 64))


def test_package_imports_without_onnx() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None; sys.modules['onnxscript'] = None\n"
        "import lightning_compress, lightning_compress.export\n"
        "from lightning_compress import export_onnx, QuantizeOnFitEnd\n"
        "import lightning_compress.export.registry, lightning_compress.export.forms\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_torch_export_of_int8_models_still_works() -> None:
    for mode in MODES:
        model = int8(mlp(), mode, True, torch.randn(32, 64))
        x = torch.randn(5, 64)
        program = torch.export.export(model, (x,))
        with torch.no_grad():  # the exported graph may take another int8 kernel than eager on this CPU
            assert rel_err(program.module()(x).numpy(), model(x)) <= 0.02


def test_runs_after_export_in_ort(tmp_path) -> None:
    model = int8(mlp())
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64))
    (out,) = run_onnx(tmp_path / "m.onnx", torch.randn(3, 64))
    assert out.shape == (3, 10)
