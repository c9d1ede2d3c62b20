"""Gradients through int8 Linear layers: those of F.linear with the dequantized weight, on every kernel."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.fbgemm import fbgemm_available
from lightning_compress.core.quant.modules import Int8Linear

INTEGER_KERNELS = ["int_mm", "dequant"] + (["fbgemm_u8s8"] if fbgemm_available() else [])


def _layer(mode, k=512, n=512, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    scale = torch.tensor([4.0 / 127]) if mode == "static" else None
    return Int8Linear.from_float(lin, mode, input_scale=scale)


def _reference_grads(layer, x, g):
    """Written another way: autograd through F.linear of the dequantized weight, on a copy of the input."""
    xr = x.detach().clone().requires_grad_(True)
    br = layer.bias.detach().clone().requires_grad_(True)
    F.linear(xr, layer.dequantize_weight(), br).backward(g)
    return xr.grad, br.grad


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("kernel", INTEGER_KERNELS)
def test_integer_kernels_pass_the_dequantized_layers_gradients(kernel, mode):
    layer = _layer(mode)
    x = torch.randn(2, 3, 512)
    g = torch.randn(2, 3, 512)
    with kernels.use_kernel(kernel):
        assert layer.kernel == kernel
        with torch.no_grad():
            expected = layer(x)
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        assert type(out.grad_fn).__name__ == "_StraightThroughBackward"
        assert torch.equal(out.detach(), expected)  # the forward is the int8 one, unchanged
        out.backward(g)
    gx, gb = _reference_grads(layer, x, g)
    torch.testing.assert_close(xg.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, gb)
    assert layer.int8_weight.grad is None and not layer.int8_weight.requires_grad


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm's kernel is the default for this layer only with fbgemm")
def test_bias_trains_when_the_input_needs_no_gradient():
    layer = _layer("dynamic")
    assert layer.kernel == "fbgemm_u8s8"  # chosen, not forced
    x, g = torch.randn(8, 512), torch.randn(8, 512)
    out = layer(x)
    out.backward(g)
    torch.testing.assert_close(layer.bias.grad, g.sum(0))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.bias.detach().clone()
    opt.step()
    torch.testing.assert_close(layer.bias.detach(), before - 0.5 * g.sum(0))


def test_trainable_layer_before_a_frozen_int8_layer_gets_its_gradient():
    torch.manual_seed(1)
    first = nn.Linear(16, 512)
    frozen = _layer("dynamic", seed=2)
    frozen.bias.requires_grad_(False)
    x = torch.randn(4, 16)
    with kernels.use_kernel("int_mm"):
        frozen(first(x)).square().sum().backward()
    got = first.weight.grad.clone()
    first.zero_grad()
    # Written another way: the same chain with the int8 layer as the dequantized float layer.
    h = first(x)
    with torch.no_grad(), kernels.use_kernel("int_mm"):
        y = frozen(h)
    F.linear(h, frozen.dequantize_weight(), frozen.bias).backward(2 * y)
    torch.testing.assert_close(got, first.weight.grad, rtol=1e-5, atol=1e-5)
    assert float(got.abs().sum()) > 0 and frozen.bias.grad is None


def test_float_kernel_and_weight_only_are_differentiated_as_they_run():
    small = _layer("dynamic", k=64, n=300)
    assert small.kernel == "float"
    x = torch.randn(5, 64, requires_grad=True)
    out = small(x)
    assert type(out.grad_fn).__name__ == "AddmmBackward0"
    wo = _layer("weight_only")
    assert "StraightThrough" not in type(wo(torch.randn(2, 512, requires_grad=True)).grad_fn).__name__
    with torch.no_grad():
        assert _layer("dynamic")(torch.randn(2, 512)).grad_fn is None


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_static_conv_passes_the_dequantized_convolutions_gradients(padding_mode):
    from lightning_compress.core.quant.conv2d import Int8Conv2d

    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, padding_mode=padding_mode)
    layer = Int8Conv2d.from_float(conv, "static", input_scale=torch.tensor([4.0 / 127]))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = layer(x)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    assert torch.equal(out.detach(), expected)
    g = torch.randn_like(out)
    out.backward(g)
    # Written another way: the float convolution with the dequantized weight (its codes passed no gradient before).
    ref = nn.Conv2d(8, 16, 3, padding=1, padding_mode=padding_mode)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize_weight())
        ref.bias.copy_(layer.bias)
    xr = x.clone().requires_grad_(True)
    ref(xr).backward(g)
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    assert float(xg.grad.abs().sum()) > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the layer's Python branches, known to the trace
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method` is deprecated:FutureWarning")
def test_traced_int8_layers_record_their_own_ops():
    # torch.jit.trace (ONNX export's tracer) cannot record a Python autograd function: it failed
    # with "unordered_map::at" before the tracing guard
    layer = _layer("dynamic")
    x = torch.randn(2, 512)
    assert layer.bias.requires_grad and torch.is_grad_enabled()
    traced = torch.jit.trace(layer, (x,), check_trace=False)
    assert "PythonOp" not in str(traced.graph)
    with torch.no_grad(), kernels.use_kernel("int_mm"):
        torch.testing.assert_close(traced(x), layer(x))
