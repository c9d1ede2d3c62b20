"""Round trips on one grid, max pooling on the codes (export/_round_trips.py): exact rewrites of the exported graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_export_chain import _const, _model, _run

from lightning_compress.export._round_trips import drop_same_grid_round_trips, max_pool_after_quantize


def _twice(z1: int, z2: int, s2: float = 0.05, bounded: bool = False, extra_reader: bool = False):
    """Q(x, 0.05, z1) [-> Min(., 127)] -> DQ(z1) -> Q(s2, z2) -> DQ(s2, z2): quantized twice, on one grid or two."""
    inits = [
        _const(0.05, np.float32, "s1"), _const(s2, np.float32, "s2"),
        _const(z1, np.uint8, "z1"), _const(z2, np.uint8, "z2"), _const(127, np.uint8, "top"),
    ]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q0"])]
    if bounded:
        nodes.append(helper.make_node("Min", ["q0", "top"], ["q"]))
    else:
        nodes.append(helper.make_node("Identity", ["q0"], ["q"]))
    nodes += [
        helper.make_node("DequantizeLinear", ["q", "s1", "z1"], ["d"]),
        helper.make_node("QuantizeLinear", ["d", "s2", "z2"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"]),
    ]
    outputs = ["y"]
    if extra_reader:  # the first DequantizeLinear has a float reader of its own
        nodes.append(helper.make_node("Relu", ["d"], ["r"]))
        outputs.append("r")
    return _model(nodes, inits, tuple(outputs))


def _x() -> np.ndarray:
    x = (np.random.default_rng(3).standard_normal((64, 8)) * 5).astype(np.float32)
    x[0, :4] = [0.025, -0.075, 6.35, -6.4]  # ties and both ends of the grid
    return x


@pytest.mark.parametrize(("z1", "z2", "bounded"), [(128, 128, False), (0, 0, False), (0, 128, True)])
def test_a_second_quantization_on_the_same_grid_goes_and_the_values_stay(z1: int, z2: int, bounded: bool) -> None:
    proto = _twice(z1, z2, bounded=bounded)
    before = _run(proto, _x())
    assert drop_same_grid_round_trips(proto) == 1
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops  # the first DQ is dead too
    for got, want in zip(_run(proto, _x()), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_first_dequantization_stays_for_its_other_reader() -> None:
    proto = _twice(128, 128, extra_reader=True)
    before = _run(proto, _x())
    assert drop_same_grid_round_trips(proto) == 1
    assert [n.op_type for n in proto.graph.node].count("DequantizeLinear") == 2
    for got, want in zip(_run(proto, _x()), before, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "case",
    [
        {"z1": 0, "z2": 128},  # codes up to 255 would saturate at zero point 128
        {"z1": 128, "z2": 0},  # negative values would clamp at 0
        {"z1": 128, "z2": 128, "s2": 0.04},  # another grid: a real second rounding
    ],
    ids=["saturates-high", "saturates-low", "other-scale"],
)
def test_a_second_quantization_that_changes_values_stays(case) -> None:
    proto = _twice(**case)
    before = _run(proto, _x())[0]
    assert drop_same_grid_round_trips(proto) == 0
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") == 2
    np.testing.assert_array_equal(_run(proto, _x())[0], before)


def _pooled(extra_reader: bool = False):
    """Relu -> MaxPool (3x3, stride 2, padded) -> Q -> DQ on a [N, 2, 6, 6] input."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    outputs = ["y", "p"] if extra_reader else ["y"]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 6, 6])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, 2, 3, 3]) for o in outputs],
        initializer=[_const(0.05, np.float32, "s"), _const(128, np.uint8, "z")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_max_pooling_moves_onto_the_codes_with_the_same_integers() -> None:
    proto = _pooled()
    x = (np.random.default_rng(4).standard_normal((16, 2, 6, 6)) * 5).astype(np.float32)
    before = _run(proto, x)[0]
    assert max_pool_after_quantize(proto) == 1
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ["Relu", "QuantizeLinear", "MaxPool", "DequantizeLinear"]
    np.testing.assert_array_equal(_run(proto, x)[0], before)


def test_a_max_pool_with_another_reader_stays_in_float() -> None:
    proto = _pooled(extra_reader=True)
    assert max_pool_after_quantize(proto) == 0
