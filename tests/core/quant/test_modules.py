import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear, int8_mm
from lightning_compress.core.quant.primitives import quantize_rows


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_int8_linear_storage_layout():
    layer = nn.Linear(24, 10)
    q = Int8Linear.from_float(layer)
    assert q.int8_weight.dtype == torch.int8 and q.int8_weight.shape == (10, 24) and q.int8_weight.is_contiguous()
    # weight.t() is the column-major [K, N] operand of torch._int_mm, with no copy.
    assert q.weight.t().stride() == (1, 24)
    assert q.weight_scale.dtype == torch.float32 and q.weight_scale.shape == (10,)
    assert isinstance(q.bias, nn.Parameter) and torch.equal(q.bias, layer.bias)
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"}  # no input_scale outside static mode
    assert [n for n, _ in q.named_parameters()] == ["bias"]
    per_tensor = Int8Linear.from_float(layer, per_channel=False)
    assert per_tensor.weight_scale.shape == (1,)


def _reference_dynamic(x, q):
    """The dynamic int8 product written out in float64: sum_k (sx_m qx_mk) (sw_n qw_nk) + b_n."""
    xq, sx = quantize_rows(x)
    w = q.int8_weight.double() * q.weight_scale.double()[:, None]
    return (xq.double() * sx.double()) @ w.t() + q.bias.double()


def test_dynamic_forward_equals_the_integer_product_written_another_way():
    layer = nn.Linear(40, 12)
    q = Int8Linear.from_float(layer, "dynamic")
    x = torch.randn(9, 40)
    with kernels.use_kernel("int_mm"):  # the s8 x s8 route; the others are tested in test_kernels.py
        assert q.kernel == "int_mm"
        torch.testing.assert_close(q(x).double(), _reference_dynamic(x, q), rtol=1e-5, atol=1e-5)
    assert _rel(q(x), layer(x)) < 0.02


def test_static_forward_uses_the_fixed_input_scale_and_saturates():
    layer = nn.Linear(8, 4)
    scale = torch.tensor(1.0 / 127)  # covers [-1, 1]
    q = Int8Linear.from_float(layer, "static", input_scale=scale)
    assert q.input_scale is not None and q.input_scale.item() == pytest.approx(1.0 / 127)
    assert "input_scale" in q.state_dict()
    x = torch.rand(5, 8) * 2 - 1
    xq = torch.round(x * 127).clamp(-127, 127)
    w = q.int8_weight.double() * q.weight_scale.double()[:, None]
    expected = (xq.double() / 127) @ w.t() + q.bias.double()
    with kernels.use_kernel("int_mm"):
        torch.testing.assert_close(q(x).double(), expected, rtol=1e-5, atol=1e-5)
        # Beyond the calibrated range the input saturates at +-1.
        torch.testing.assert_close(q(x * 0 + 5.0), q(x * 0 + 1.0))
    with pytest.raises(ValueError, match="needs an `input_scale`"):
        Int8Linear.from_float(layer, "static")


def test_weight_only_computes_with_the_dequantized_weight():
    layer = nn.Linear(16, 6, bias=False)
    q = Int8Linear.from_float(layer, "weight_only", per_channel=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize_weight()))
    assert q.bias is None


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_leading_dims_dtypes_and_empty_batches(mode):
    layer = nn.Linear(16, 8)
    q = Int8Linear.from_float(layer, mode)
    x = torch.randn(2, 3, 16)
    out = q(x)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[1, 2], q(x[1, 2:3])[0])
    assert q(torch.zeros(0, 16)).shape == (0, 8)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert _rel(q(x.bfloat16()).float(), layer(x)) < 0.03


def test_pruned_weights_stay_zero_and_zero_rows_give_the_bias():
    layer = nn.Linear(10, 6)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0.0
        layer.weight[2] = 0.0
    q = Int8Linear.from_float(layer)
    assert torch.equal(q.weight == 0, layer.weight == 0)
    assert q.weight_scale[2] == 0.0
    out = q(torch.randn(4, 10))
    torch.testing.assert_close(out[:, 2], layer.bias[2].expand(4))
    assert not torch.isnan(q(torch.zeros(3, 10))).any()


def test_int8_mm_matches_an_integer_matmul_on_odd_shapes():
    for m, k, n in [(1, 3, 5), (2, 7, 9), (33, 64, 16)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        out = int8_mm(a, w)
        assert out is not None and out.dtype == torch.int32
        assert torch.equal(out, a.long().mm(w.long().t()).int())
    assert int8_mm(torch.zeros(2, 3, dtype=torch.int8, device="meta"), torch.zeros(4, 3, dtype=torch.int8)) is None


def test_casting_the_model_keeps_int8_weights_and_float32_scales():
    q = Int8Linear.from_float(nn.Linear(8, 4), "static", input_scale=torch.tensor(0.01))
    before = q.weight_scale.clone()
    q.to(torch.bfloat16)
    assert q.int8_weight.dtype == torch.int8
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, before)
    assert q.input_scale is not None and q.input_scale.dtype == torch.float32
    assert q.bias is not None and q.bias.dtype == torch.bfloat16
    q.half()
    assert q.weight_scale.dtype == torch.float32
    assert q(torch.randn(2, 8).half()).dtype == torch.half


def test_configure_switches_mode_and_granularity():
    q = Int8Linear.from_float(nn.Linear(8, 4))
    q.configure("static", per_channel=False)
    assert q.mode == "static" and q.weight_scale.shape == (1,) and "input_scale" in q.state_dict()
    q.configure("weight_only", per_channel=True)
    assert q.weight_scale.shape == (4,) and "input_scale" not in q.state_dict()
    with pytest.raises(ValueError, match="mode"):
        q.configure("int4", True)
    with pytest.raises(ValueError, match="mode"):
        Int8Linear(4, 4, mode="fp8")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3},
        {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
        {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "padding": 1, "groups": 8},  # depthwise
        {"in_channels": 8, "out_channels": 4, "kernel_size": (3, 1), "padding": (1, 0), "groups": 2},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "dilation": 2, "padding": "same"},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": "same", "padding_mode": "circular"},
    ],
)
def test_int8_conv_equals_the_float_conv_with_the_dequantized_weight(kwargs):
    conv = nn.Conv2d(**kwargs)
    q = Int8Conv2d.from_float(conv)
    assert q.int8_weight.dtype == torch.int8 and q.weight.shape == conv.weight.shape
    x = torch.randn(2, conv.in_channels, 9, 9)
    ref = nn.Conv2d(**kwargs)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize_weight())
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    torch.testing.assert_close(q(x), ref(x))
    assert _rel(q(x), conv(x)) < 0.03
    assert "groups" in repr(q) or conv.groups == 1


def test_conv_static_mode_puts_input_and_output_on_their_int8_grids():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    s_in, s_out = x.abs().amax() / 127, conv(x).abs().amax().detach() / 127
    q = Int8Conv2d.from_float(conv, "static", input_scale=s_in)
    assert q.mode == "static" and float(q.input_scale) == pytest.approx(float(s_in))
    assert float(q.output_scale) == 0.0  # until calibrated: the output stays float
    weight = q.dequantize_weight()
    x_grid = torch.clamp(torch.round(x / s_in), -127, 127) * s_in
    step = s_in * q.weight_scale  # the int32 bias grid of each output channel
    bias = torch.round(q.bias.detach() / step) * step
    assert not torch.equal(bias, q.bias.detach()) and (bias - q.bias).abs().max() <= step.max() / 2
    # the integer reference: int64 codes, an exact float64 sum, the bias as its count of the product step
    codes = torch.clamp(torch.round(x / s_in), -127, 127).double()
    acc = F.conv2d(codes, q.int8_weight.double(), None, padding=1)
    assert torch.equal(acc, acc.round())  # integers
    count = torch.round(q.bias.detach() / step)
    total = (acc + count.double().reshape(1, -1, 1, 1)).float()
    with torch.no_grad():
        plain = q(x)
        assert torch.equal(plain, total * step.reshape(1, -1, 1, 1))
        # the float form (dequantized input times dequantized weight) differs only by float rounding
        torch.testing.assert_close(plain, F.conv2d(x_grid, weight, bias, padding=1), atol=1e-5, rtol=0)
        q.set_output_scale(s_out)
        got = q(x)
    multiplier = (step / s_out).reshape(1, -1, 1, 1)  # float32, as ONNX Runtime's QLinearConv computes it
    assert torch.equal(got, torch.clamp(torch.round(total * multiplier), -127, 127) * s_out)
    assert torch.equal(torch.round(got / s_out) * s_out, got)  # every output is on the grid
    assert sorted(q.state_dict()) == ["bias", "input_scale", "output_scale", "weight", "weight_scale"]
    assert q.half().output_scale.dtype == torch.float32  # the scales stay float32 under a cast
    dynamic = Int8Conv2d.from_float(conv, "dynamic")
    assert dynamic.input_scale is None and dynamic.output_scale is None
    with pytest.raises(ValueError, match="Only a static int8 convolution has an `output_scale`; this one is 'dynamic'"):
        dynamic.set_output_scale(s_out)
    dynamic.configure("static", True)
    assert sorted(dynamic.state_dict()) == ["bias", "input_scale", "output_scale", "weight", "weight_scale"]
    dynamic.configure("weight_only", True)
    assert dynamic.input_scale is None and dynamic.output_scale is None


def test_static_conv_with_zero_scales_computes_as_its_float_weights():
    """An artifact written before convolutions had activation scales loads with both at 0: float activations."""
    conv = nn.Conv2d(2, 3, 3)
    q = Int8Conv2d.from_float(conv, "static", input_scale=torch.tensor(0.0))
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(q(x), F.conv2d(x, q.dequantize_weight(), q.bias))


def test_repr_names_mode_and_granularity():
    assert "mode='dynamic', per_channel" in repr(Int8Linear(4, 2))
    assert "per_tensor" in repr(Int8Conv2d(2, 2, 3, per_channel=False, padding_mode="reflect"))


def test_static_convs_torch_export_to_what_eager_computes():
    from lightning_compress.core.quant.convert import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)).eval()
    quantize(model, "static", calibration=[torch.randn(4, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    step = float(model[2].output_scale)
    with torch.no_grad():
        want = model(x)
        program = torch.export.export(model, (x,)).module()  # no data-dependent branch on the scales
        # the graph computes the float form, eager the integer one (Int8Conv2d._integer_forward): the same
        # codes up to float rounding, where a sum within a rounding error of a half step takes the other code
        got = program(x)
        assert torch.equal(torch.round(got / step) * step, got)  # on the output grid
        assert (got == want).float().mean() >= 0.99 and float((got - want).abs().max()) <= step * 1.001
        model[2].output_scale.zero_()  # an artifact without activation scales: float output, in the graph too
        program = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=0)
        assert not torch.equal(torch.round(model(x) / step) * step, model(x))  # really float now
