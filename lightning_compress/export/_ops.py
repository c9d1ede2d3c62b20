"""The int8 operators an exported graph is made of, as ``torch.library`` custom operators.

The export-form modules (:mod:`lightning_compress.export.forms`) call these instead of the int8
layers' own kernels, so that ``torch.export`` records one node per int8 layer with its raw int8
weight, scales and bias as inputs; :mod:`lightning_compress.export.translate` then writes each
node as the ONNX pattern that ONNX Runtime fuses (see :doc:`/deploying`).

Their eager implementations compute in float32 from the dequantized weight: they are what
``torch.export`` traces through (for shapes and dtypes) and a readable reference, not a fast path.
A weight here is ``[K, N]`` for a product (the layer's ``[N, K]`` weight transposed, the layout of
``MatMulInteger``) or the layer's own layout for :func:`dequantize_weight`; ``zero`` is ``0`` for
``torch.int8`` storage and ``128`` for ``torch.uint8`` storage (the int8 value plus 128).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NAMESPACE", "dequantize_weight", "linear_dynamic", "linear_static", "quantize_activation"]

NAMESPACE = "lightning_compress"


def _dequant(q: Tensor, scale: Tensor, zero: int, axis: int) -> Tensor:
    shape = [1] * q.dim()
    if scale.dim() > 0:
        shape[axis] = -1
    return (q.to(torch.float32) - zero) * scale.to(torch.float32).reshape(shape)


@torch.library.custom_op(f"{NAMESPACE}::dequantize_weight", mutates_args=())
def dequantize_weight(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """``(q - zero_point) * scale`` along ``axis``; ONNX ``DequantizeLinear``.

    ``scale`` and ``zero_point`` (of ``q``'s dtype) are 0-d (one for the tensor) or 1-d along ``axis``.
    """
    shape = [1] * q.dim()
    if scale.dim() > 0:
        shape[axis] = -1
    zero = zero_point.to(torch.float32).reshape(shape)
    return (q.to(torch.float32) - zero) * scale.to(torch.float32).reshape(shape)


@dequantize_weight.register_fake
def _(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::linear_dynamic", mutates_args=())
def linear_dynamic(x: Tensor, wt: Tensor, w_scale: Tensor, zero: int, bias: Tensor | None) -> Tensor:
    """``x @ dequant(wt) + bias`` with the activation quantized at run time (``DynamicQuantizeLinear``)."""
    out = x.to(torch.float32) @ _dequant(wt, w_scale, zero, 1)
    return out if bias is None else out + bias.to(torch.float32)


@linear_dynamic.register_fake
def _(x: Tensor, wt: Tensor, w_scale: Tensor, zero: int, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], wt.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::linear_static", mutates_args=())
def linear_static(
    x: Tensor, wt: Tensor, w_scale: Tensor, w_zero: Tensor, input_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """``x @ dequant(wt) + bias`` with the activation quantized with the calibrated ``input_scale``.

    ``w_zero`` is the weight zero point, shaped like ``w_scale`` (``[N]`` or 0-d).
    """
    shape = [1, -1] if w_scale.dim() > 0 else [1, 1]
    weight = (wt.to(torch.float32) - w_zero.to(torch.float32).reshape(shape)) * w_scale.to(torch.float32).reshape(shape)
    out = _activation_grid(x, input_scale) @ weight
    return out if bias is None else out + bias.to(torch.float32)


@linear_static.register_fake
def _(x: Tensor, wt: Tensor, w_scale: Tensor, w_zero: Tensor, input_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], wt.shape[1]), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::quantize_activation", mutates_args=())
def quantize_activation(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` on the int8 grid of the calibrated ``scale``.

    ONNX ``QuantizeLinear -> DequantizeLinear`` (uint8, zero point 128: the grid ``-128..127``).
    """
    return _activation_grid(x, scale)


def _activation_grid(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` on the grid ``-128..127`` of ``scale`` (uint8 with zero point 128), in float32."""
    s = scale.to(torch.float32)
    return torch.round(x.to(torch.float32) / s).clamp_(-128, 127) * s


@quantize_activation.register_fake
def _(x: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)
