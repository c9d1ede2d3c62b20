"""The rewrites that let ONNX Runtime chain static int8 layers (export/_chain.py): exact, or within their bound."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import int8, rel_err, run_onnx
from test_export_fusion import optimized_ops
from torch import nn

from lightning_compress import export_onnx
from lightning_compress.export._chain import (
    HALF_GRID,
    int8_weights_where_safe,
    int32_gemm_bias,
    relu_after_quantize,
    requantize_on_one_grid,
)


def _run(proto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _const(value, dtype, name: str):
    return numpy_helper.from_array(np.array(value, dtype), name)


def _model(nodes, inits, outputs=("y",)):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, None]) for o in outputs],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(
    ("dtype", "zero", "after"),
    [(np.uint8, 128, "Min"), (np.uint8, 0, "Max"), (np.int8, 0, "Max"), (np.int8, -5, "Max")],
)
def test_relu_moves_past_the_quantization_exactly(dtype, zero: int, after: str) -> None:
    inits = [_const(0.05, np.float32, "s"), _const(zero, dtype, "z")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    proto = _model(nodes, inits)
    x = (np.random.default_rng(0).standard_normal((64, 8)) * 4).astype(np.float32)  # also beyond the grid
    before = _run(proto, x)[0]
    assert relu_after_quantize(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", after, "DequantizeLinear"]
    onnx.checker.check_model(proto)
    np.testing.assert_array_equal(_run(proto, x)[0], before)
    if after == "Min":  # the export's own form: the non-negative half of its grid, as uint8 below 128
        q = proto.graph.node[0]
        assert {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}[q.input[2]] == 0


def test_a_relu_with_a_float_reader_stays_for_it() -> None:
    inits = [_const(0.05, np.float32, "s"), _const(128, np.uint8, "z")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        helper.make_node("Add", ["r", "y"], ["y2"]),  # the residual reads the float ReLU
    ]
    proto = _model(nodes, inits, outputs=("y2",))
    x = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    before = _run(proto, x)[0]
    assert relu_after_quantize(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Relu") == 1 and "Min" in ops
    np.testing.assert_array_equal(_run(proto, x)[0], before)


def _half_grid_gemm(second_reader: bool = False):
    """Relu -> Q(128) -> DQ -> Gemm with a uint8 weight (zero point 128), as the export writes it."""
    rng = np.random.default_rng(4)
    inits = [
        _const(0.05, np.float32, "s"),
        _const(128, np.uint8, "z"),
        numpy_helper.from_array(rng.integers(1, 256, size=(8, 4)).astype(np.uint8), "w"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw"),
        numpy_helper.from_array(np.full(4, 128, np.uint8), "zw"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("Gemm", ["xd", "wd"], ["y"]),
    ]
    outputs = ("y",)
    if second_reader:  # the same weight read by a Gemm of the signed input too
        nodes.append(helper.make_node("Gemm", ["x", "wd"], ["y2"]))
        outputs = ("y", "y2")
    return _model(nodes, inits, outputs=outputs)


def test_weights_of_half_grid_layers_become_int8_with_the_same_values() -> None:
    proto = _half_grid_gemm()
    x = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    before = _run(proto, x)[0]
    w_before = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    assert relu_after_quantize(proto) == 1 and int8_weights_where_safe(proto) == 1
    onnx.checker.check_model(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert inits["w"].dtype == np.int8
    np.testing.assert_array_equal(inits["w"].astype(np.int16), w_before.astype(np.int16) - 128)
    np.testing.assert_array_equal(_run(proto, x)[0], before)


def test_a_weight_that_a_signed_input_also_reads_stays_uint8() -> None:
    proto = _half_grid_gemm(second_reader=True)
    relu_after_quantize(proto)
    assert int8_weights_where_safe(proto) == 0
    assert {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["w"].dtype == np.uint8


def _static_gemm(weight_scale: np.ndarray, bias: np.ndarray):
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, size=(8, 4)).astype(np.int8)  # [K, N], as the export stores it
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "sx"),
        numpy_helper.from_array(np.array(128, np.uint8), "zx"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(weight_scale.astype(np.float32), "sw"),
        numpy_helper.from_array(np.zeros(weight_scale.shape, np.int8), "zw"),
        numpy_helper.from_array(bias.astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
        helper.make_node("Gemm", ["xd", "wd"], ["g"]),
        helper.make_node("Add", ["g", "b"], ["y"]),
    ]
    return _model(nodes, inits)


def test_the_bias_goes_into_the_gemm_on_the_product_grid() -> None:
    sw = np.array([0.01, 0.003, 0.02, 0.007])
    bias = np.array([0.5, -1.25, 3.0, 0.001])
    proto = _static_gemm(sw, bias)
    x = np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32)
    before = _run(proto, x)[0]
    assert int32_gemm_bias(proto) == 1
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "QuantizeLinear", "DequantizeLinear",
                                                     "DequantizeLinear", "Gemm"]  # fmt: skip
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert "b" not in inits and inits["b_int32"].dtype == np.int32
    step = (0.02 * sw).astype(np.float32)
    np.testing.assert_array_equal(inits["b_int32"], np.round(bias / step).astype(np.int32))
    # each output moves by the rounding of its bias only: at most half a product step
    assert np.all(np.abs(_run(proto, x)[0] - before) <= step / 2 + 1e-6)


def test_a_bias_the_grid_cannot_hold_keeps_its_float_add() -> None:
    for sw, bias in ((np.array([0.01, 0.0, 0.02, 0.01]), np.ones(4)), (np.full(4, 1e-9), np.full(4, 1e6))):
        proto = _static_gemm(sw, bias)
        assert int32_gemm_bias(proto) == 0
        assert [n.op_type for n in proto.graph.node][-1] == "Add"


def test_a_static_mlp_runs_as_one_chain_of_qgemms(tmp_path) -> None:
    torch.manual_seed(0)
    calib = torch.randn(64, 32)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    model = int8(model.eval(), "static", True, calib)
    path = tmp_path / "mlp.onnx"
    export_onnx(model, path, calib[:4])
    written = onnx.load(str(path))
    assert Counter(n.op_type for n in written.graph.node) >= Counter({"Min": 2, "Gemm": 3})
    assert not {"Relu", "Add"} & {n.op_type for n in written.graph.node}
    # the layers after a ReLU read uint8 inputs below 128: int8 weights whatever the CPU (no saturation)
    dtypes = {i.name: i.data_type for i in written.graph.initializer}
    weight_dq = [n for n in written.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]]
    assert [dtypes[n.input[0]] for n in weight_dq][1:] == [TensorProto.INT8, TensorProto.INT8]
    ops = optimized_ops(path, tmp_path)
    # ONNX Runtime's own quantize_static chain: each QGemm writes the next one's uint8 input
    assert ops["QGemm"] == 3 and ops["QuantizeLinear"] == 1 and "DequantizeLinear" not in ops, ops
    x = torch.randn(20, 32)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want) <= 0.02


def _round_trip(s_in: float, s_out: float, second_reader: bool = False):
    """DQ(q, s_in, 128) -> Q(s_out, half grid) -> Min -> DQ: a convolution's output read as the next one's input.

    ``second_reader``: the first quantization ``q`` is also read by another ``DequantizeLinear`` (output ``y2``).
    """
    inits = [
        _const(s_in, np.float32, "s_in"),
        _const(s_out, np.float32, "s_out"),
        _const(128, np.uint8, "z"),
        _const(0, np.uint8, f"{HALF_GRID}_zero"),
        _const(127, np.uint8, f"{HALF_GRID}_top"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s_in", "z"], ["q"]),  # the first layer's quantized output
        helper.make_node("DequantizeLinear", ["q", "s_in", "z"], ["d"]),
        helper.make_node("QuantizeLinear", ["d", "s_out", f"{HALF_GRID}_zero"], ["q2"]),
        helper.make_node("Min", ["q2", f"{HALF_GRID}_top"], ["m"]),
        helper.make_node("DequantizeLinear", ["m", "s_out", f"{HALF_GRID}_zero"], ["y"]),
    ]
    if second_reader:
        nodes.append(helper.make_node("DequantizeLinear", ["q", "s_in", "z"], ["y2"]))
    return _model(nodes, inits, ("y", "y2") if second_reader else ("y",))


def test_a_round_trip_on_one_grid_becomes_integer_ops_exactly() -> None:
    proto = _round_trip(0.05, 0.05, second_reader=True)
    x = (np.random.default_rng(6).standard_normal((64, 8)) * 4).astype(np.float32)
    before = _run(proto, x)
    assert requantize_on_one_grid(proto) == 1
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["QuantizeLinear", "Max", "Sub", "Min", "DequantizeLinear", "DequantizeLinear"]
    for got, want in zip(_run(proto, x), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_round_trip_after_a_quantization_nothing_else_reads_moves_that_quantization_to_the_half_grid() -> None:
    proto = _round_trip(0.05, 0.05)
    x = (np.random.default_rng(6).standard_normal((256, 8)) * 4).astype(np.float32)
    x[0, :4] = [0.025, 0.075, -0.025, 6.35]  # ties and the top of the half grid
    before = _run(proto, x)[0]
    assert requantize_on_one_grid(proto) == 1
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", "Min", "DequantizeLinear"]
    assert proto.graph.node[0].input[2] == f"{HALF_GRID}_zero"
    np.testing.assert_array_equal(_run(proto, x)[0], before)


def test_a_round_trip_between_two_grids_stays() -> None:
    proto = _round_trip(0.05, 0.04)
    assert requantize_on_one_grid(proto) == 0
    assert "DequantizeLinear" in [n.op_type for n in proto.graph.node][:2]


def test_a_resnet_block_runs_its_two_convolutions_back_to_back(tmp_path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet.BasicBlock(8, 8).eval()
    calib = torch.randn(8, 8, 12, 12)
    with torch.no_grad():
        model.train()(calib)
    model = int8(model.eval(), "static", True, calib)
    assert model.conv1.output_scale.item() == model.conv2.input_scale.item()
    path = tmp_path / "block.onnx"
    export_onnx(model, path, calib[:2])
    written = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # conv1 writes conv2's input codes itself: on the half grid, then Min(., 127); no Max / Sub between them
    assert written["Min"] >= 1 and "Max" not in written and "Sub" not in written, written
    ops = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 2, ops
    x = torch.randn(5, 8, 12, 12)
    got = run_onnx(path, x)[0]
    with torch.no_grad():
        want = model(x)
    assert rel_err(got, want) <= 0.02
