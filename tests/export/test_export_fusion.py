"""The int8 patterns of the export are the ones ONNX Runtime fuses into its int8 kernels (its optimized graph)."""

from __future__ import annotations

from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx_helpers import int8, rel_err, run_onnx
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.core.quant.fbgemm import has_vnni


def optimized_ops(path, tmp_path) -> Counter[str]:
    """``{op_type: count}`` of the graph ONNX Runtime runs (``ORT_ENABLE_ALL``, CPU)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_static_linear_runs_as_qgemm_and_dynamic_as_dynamic_quantize_matmul(tmp_path, weight_dtype: str) -> None:
    torch.manual_seed(0)
    calib = torch.randn(64, 32)
    for mode, kernel in (("static", "QGemm"), ("dynamic", "DynamicQuantizeMatMul")):
        model = int8(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), mode, True, calib)
        path = tmp_path / f"{mode}.onnx"
        export_onnx(model, path, calib[:4], weight_dtype=weight_dtype)
        ops = optimized_ops(path, tmp_path)
        assert ops[kernel] == 2, ops
        assert "DequantizeLinear" not in ops and "MatMulInteger" not in ops and "FusedGemm" not in ops, ops


def test_static_linear_on_a_3d_input_is_fused_and_agrees(tmp_path) -> None:
    torch.manual_seed(0)
    calib = torch.randn(4, 6, 32)
    model = int8(nn.Sequential(nn.Linear(32, 16)).eval(), "static", True, calib)
    path = tmp_path / "seq.onnx"
    export_onnx(model, path, calib[:2], weight_dtype="uint8")
    assert optimized_ops(path, tmp_path)["QGemm"] == 1
    x = torch.randn(3, 6, 32)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert got.shape == (3, 6, 16)
    assert rel_err(got, want) <= 0.02


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_conv_weights_stay_int8_in_the_file_and_fold_to_a_float_conv(tmp_path, weight_dtype: str) -> None:
    torch.manual_seed(0)
    calib = torch.randn(4, 3, 16, 16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)).eval()
    model = int8(model, "dynamic", True, calib)
    path = tmp_path / "conv.onnx"
    export_onnx(model, path, calib[:2], weight_dtype=weight_dtype)
    inits = onnx.load(str(path)).graph.initializer
    assert sorted(tuple(i.dims) for i in inits if len(i.dims) == 4 and i.data_type != onnx.TensorProto.FLOAT) == [
        (8, 1, 3, 3),
        (8, 3, 3, 3),
    ]
    ops = optimized_ops(path, tmp_path)
    assert "DequantizeLinear" not in ops and "Cast" not in ops, ops  # folded into float weights at load
    got = run_onnx(path, calib)[0]
    with torch.no_grad():
        want = model(calib)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_static_convs_run_as_qlinearconv_with_int8_weights_and_agree(tmp_path, weight_dtype: str) -> None:
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 1, groups=2),  # grouped
    ).eval()
    model = int8(model, "static", True, calib)
    path = tmp_path / "conv.onnx"
    export_onnx(model, path, calib[:2], weight_dtype=weight_dtype)
    inits = onnx.load(str(path)).graph.initializer
    int8_weights = [i for i in inits if len(i.dims) == 4 and i.data_type != onnx.TensorProto.FLOAT]
    assert sorted(tuple(i.dims) for i in int8_weights) == [(8, 1, 3, 3), (8, 3, 3, 3), (8, 4, 1, 1)]
    assert "Cast" not in Counter(n.op_type for n in onnx.load(str(path)).graph.node)  # weights stay QDQ
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 3 and "Conv" not in ops and "FusedConv" not in ops, ops
    if weight_dtype == "int8" and not has_vnni():
        return  # u8 x s8 products saturate int16 on this CPU (measured 0.04 here): what `weight_dtype="auto"` avoids
    x = torch.randn(5, 3, 16, 16)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert got.shape == (5, 8, 16, 16)
    assert rel_err(got, want) <= 0.02
    # Most outputs land on the same step of the output grid (ONNX Runtime requantizes in its own order).
    step = float(model[3].output_scale)
    assert (abs(got - want.numpy()) <= step * 1.01).mean() >= 0.98


def test_folded_batch_norms_leave_no_float_op_between_qlinearconvs(tmp_path) -> None:
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
    )  # fmt: skip
    with torch.no_grad():
        model.train()(calib)  # batch statistics of the data, as after training
    model = int8(model.eval(), "static", True, calib)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path = tmp_path / "folded.onnx"
    export_onnx(model, path, calib[:2])
    assert "BatchNormalization" not in Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 2 and "Conv" not in ops and "BatchNormalization" not in ops, ops
    x = torch.randn(5, 3, 16, 16)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want) <= 0.02


def test_static_resnet18_runs_its_residual_additions_as_qlinearadd(tmp_path) -> None:
    """Each block's input is on its first convolution's grid (core/quant/residual.py): int8 additions.

    Before: 20 QLinearConv, 8 float Add (each between DequantizeLinear and QuantizeLinear), a float Relu
    and max pool in the stem.
    """
    tv = pytest.importorskip("torchvision")
    from lightning_compress.core.quant.convert import quantize

    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10)
    calib = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model.train()(calib)
    model.eval()
    assert len(quantize(model, "static", calibration=[calib]).input_grids) == 8
    path = tmp_path / "resnet18.onnx"
    export_onnx(model, path, calib[:2])
    ops = optimized_ops(path, tmp_path)
    # the last block's sum goes to the average pool in float; the other seven stay int8
    assert ops["QLinearAdd"] == 7 and ops["Add"] == 1 and ops["QLinearConv"] == 20, ops
    # the stem's ReLU and max pool run on the codes (core/quant/grids.py, export/_round_trips.py); the one
    # float Relu and the two dequantizations are the last block's, before the average pool
    assert ops["Relu"] == 1 and ops["DequantizeLinear"] == 2 and ops["NhwcMaxPool"] == 1, ops
    x = torch.randn(4, 3, 32, 32)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want) <= 0.02
