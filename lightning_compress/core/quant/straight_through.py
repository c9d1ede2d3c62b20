"""Gradients through int8 layers: those of the float layer with the dequantized weight.

An int8 product has no useful gradient of its own: rounding is flat almost everywhere, fbgemm's
``quantized::linear_dynamic`` has no autograd kernel at all, the rescale of the ``int_mm`` path
would pass a gradient through the activation scales only, and a static convolution's input codes
pass none. So where autograd asks for one (a second fit of an int8 model, a trainable layer
before a frozen int8 one, an input attribution), an :class:`Int8Linear
<lightning_compress.core.quant.modules.Int8Linear>` on an integer kernel and a static
:class:`Int8Conv2d <lightning_compress.core.quant.conv2d.Int8Conv2d>` compute their output as
always and their gradients as the dequantized float layer would (``F.linear`` / ``F.conv2d`` with
:math:`s_W Q_W` and the bias as it is): the straight-through estimator of quantization-aware
training, with the weight frozen. The int8 weight gets none (a buffer). The backward recomputes
that float layer on the saved input. Layers whose call *is* that float layer (the ``"float"`` and
``"sparse"`` kernels, ``mode="weight_only"``, dynamic convolutions) are differentiated as they run
and do not come here. Under ``torch.no_grad()`` / ``torch.inference_mode()`` nothing of this runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_compress.core.quant.conv2d import Int8Conv2d
    from lightning_compress.core.quant.modules import Int8Linear

__all__ = ["needs_grad", "straight_through"]


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, layer: Any) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, bias)
        out: Tensor = layer._int8_forward(x)  # autograd is off inside an autograd.Function's forward
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, bias = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need_x)
            br = None if bias is None else bias.detach().requires_grad_(need_b)
            out = ctx.layer._dequantized_forward(xr, br)
            wanted = [t for t, need in ((xr, need_x), (br, need_b)) if need and t is not None]
            grads = list(torch.autograd.grad(out, wanted, grad))
        grad_x = grads.pop(0) if need_x else None
        grad_b = grads.pop(0) if need_b and bias is not None else None
        return grad_x, grad_b, None


def straight_through(layer: Int8Linear | Int8Conv2d, x: Tensor) -> Tensor:
    """``layer``'s int8 output, with the gradients of its dequantized float layer (see the module docstring).

    Example:
        >>> from torch import nn
        >>> from lightning_compress.core.quant.modules import Int8Linear
        >>> layer = Int8Linear.from_float(nn.Linear(3, 2), "dynamic")
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> straight_through(layer, x).sum().backward()
        >>> torch.allclose(x.grad, layer.dequantize_weight().sum(0).expand(4, 3))
        True
    """
    out: Tensor = _StraightThrough.apply(x, layer.bias, layer)
    return out


def needs_grad(layer: Int8Linear | Int8Conv2d, x: Tensor) -> bool:
    """Whether autograd records this call: it is on and the input or the bias requires a gradient.

    Never while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` (ONNX export) records
    the graph: that keeps the layer's own ops, with no custom autograd function in it.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    bias = layer._parameters.get("bias")
    return x.requires_grad or (bias is not None and bias.requires_grad)
