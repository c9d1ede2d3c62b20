"""Small ``"float"``-kernel int8 Linear layers compute in int8 (fbgemm's route) for calls with enough rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.crossover import (
    CROSSOVER_MAX_ROWS,
    CROSSOVER_MIN_SIDE,
    CROSSOVER_MIN_WEIGHTS,
    CROSSOVER_WORK,
    crossover_rows,
)
from lightning_compress.core.quant.modules import Int8Linear

# Where the rule applies: x86 with VNNI and fbgemm (as on the CI machine); elsewhere no layer switches.
ON = kernels.has_vnni() and kernels.fbgemm_available()


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_crossover_rows_is_the_measured_work_rule():
    # Rows x weights reach 2^21 (static, one thread); twice that for dynamic and for more threads,
    # eight times for dynamic on more threads; ceiling division.
    assert crossover_rows(300, 100, "static", 1) == 70 == -(-CROSSOVER_WORK // 30000)
    assert crossover_rows(300, 100, "dynamic", 1) == 140
    assert crossover_rows(300, 100, "static", 2) == 140 == crossover_rows(300, 100, "static", 16)
    assert crossover_rows(256, 256, "dynamic", 2) == 256 == (CROSSOVER_WORK << 3) // 65536
    assert crossover_rows(64, 300, "static", 1) == 110  # 2^21 / 19200 = 109.2
    # Never: more rows than the largest measured count, too few weights, a narrow side, weight-only.
    assert crossover_rows(300, 100, "dynamic", 2) is None  # 560 rows > 512
    assert crossover_rows(128, 128, "dynamic", 2) is None  # 1024 rows
    assert crossover_rows(100, 10, "static", 1) is None
    assert crossover_rows(128, 127, "static", 1) is None  # 16256 < 2^14 weights
    assert crossover_rows(128, 128, "static", 1) == 128 and CROSSOVER_MIN_WEIGHTS == 128 * 128
    assert crossover_rows(4096, CROSSOVER_MIN_SIDE - 1, "static", 1) is None
    assert crossover_rows(4096, CROSSOVER_MIN_SIDE, "static", 1) == 8
    assert crossover_rows(300, 100, "weight_only", 1) is None
    assert CROSSOVER_MAX_ROWS == 512


def _layer(mode: str) -> Int8Linear:
    torch.manual_seed(0)
    float_layer = nn.Linear(300, 100)
    calibration = torch.relu(torch.randn(64, 300)) * 2
    if mode == "static":  # calibrated on inputs like the ones below (a few of them leave the range)
        return Int8Linear.from_float(float_layer, mode, input_scale=calibration.abs().amax() / 127)
    return Int8Linear.from_float(float_layer, mode)


def _forced(layer: Int8Linear, kernel: str, x: torch.Tensor) -> torch.Tensor:
    twin = copy.deepcopy(layer)  # a copy of its own: forcing rebuilds the plan
    with kernels.use_kernel(kernel), torch.no_grad():
        return twin(x)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_call_from_the_crossover_rows_computes_what_fbgemm_computes(threads, mode):
    threads(1)
    layer = _layer(mode)
    assert layer.kernel == "float"
    rows = kernels.int8_from_rows(layer)
    x = torch.relu(torch.randn(CROSSOVER_MAX_ROWS + 1, 300)) * 2
    if not ON:
        assert rows is None
        with torch.no_grad():
            assert torch.equal(layer(x), _forced(layer, "float", x))
        return
    assert rows == (70 if mode == "static" else 140)
    with torch.no_grad():
        for n in (rows, CROSSOVER_MAX_ROWS):  # int8: fbgemm's result, bit for bit
            got, fb, fl = layer(x[:n]), _forced(layer, "fbgemm_u8s8", x[:n]), _forced(layer, "float", x[:n])
            assert torch.equal(got, fb) and not torch.equal(got, fl)
        for n in (rows - 1, CROSSOVER_MAX_ROWS + 1):  # float: the dequantized weight's GEMM
            assert torch.equal(layer(x[:n]), _forced(layer, "float", x[:n]))
        # Leading dimensions count as rows.
        three = x[: 2 * rows].reshape(2, rows, 300)
        assert torch.equal(layer(three), _forced(layer, "fbgemm_u8s8", x[: 2 * rows]).reshape(2, rows, 100))


def test_the_crossover_depends_on_the_thread_count(threads):
    static, dynamic = _layer("static"), _layer("dynamic")
    threads(2)
    if not ON:
        assert kernels.int8_from_rows(static) is None
        return
    assert kernels.int8_from_rows(static) == 140 and kernels.int8_from_rows(dynamic) is None
    x = torch.randn(200, 300)
    with torch.no_grad():
        assert torch.equal(dynamic(x), _forced(dynamic, "float", x))
        assert torch.equal(static(x), _forced(static, "fbgemm_u8s8", x))
    threads(1)
    assert kernels.int8_from_rows(dynamic) == 140
    with torch.no_grad():
        assert torch.equal(dynamic(x), _forced(dynamic, "fbgemm_u8s8", x))


def test_calls_that_autograd_records_stay_float_and_train(threads):
    threads(1)
    layer = _layer("dynamic")
    x = torch.randn(256, 300)
    out = layer(x)  # grad mode on, the bias requires grad
    assert torch.equal(out.detach(), _forced(layer, "float", x))
    out.sum().backward()
    assert layer.bias.grad is not None and torch.equal(layer.bias.grad, torch.full((100,), 256.0))
    x.requires_grad_(True)
    with torch.no_grad():  # no_grad: int8 where the rule says so
        expected = _forced(layer, "fbgemm_u8s8" if ON else "float", x)
        assert torch.equal(layer(x), expected)


def test_forced_kernels_and_other_layers_do_not_switch(threads):
    threads(1)
    layer = _layer("dynamic")
    x = torch.randn(256, 300)
    with kernels.use_kernel("float"), torch.no_grad():
        twin = copy.deepcopy(layer)
        assert kernels.int8_from_rows(twin) is None
        forced = twin(x)
    torch.testing.assert_close(forced, nn.functional.linear(x, layer.dequantize_weight(), layer.bias))
    narrow = Int8Linear.from_float(nn.Linear(100, 10), "dynamic")
    weight_only = Int8Linear.from_float(nn.Linear(300, 100), "weight_only")
    assert kernels.int8_from_rows(narrow) is None and kernels.int8_from_rows(weight_only) is None
    big = Int8Linear.from_float(nn.Linear(1024, 1024), "dynamic")
    assert big.kernel != "float" or not ON
    assert kernels.int8_from_rows(big) is None  # not a "float"-kernel layer (or no VNNI)
