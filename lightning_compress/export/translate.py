"""ONNX patterns for the custom operators of :mod:`lightning_compress.export._ops` (written with onnxscript).

Each pattern is the one ONNX Runtime's CPU graph optimizer fuses into its fast int8 kernel (checked
by dumping the optimized graph with ``SessionOptions.optimized_model_filepath``; see :doc:`/deploying`):

* dynamic Linear: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add)``, fused into
  ``com.microsoft.DynamicQuantizeMatMul`` (the pattern ``onnxruntime.quantization.quantize_dynamic``
  writes);
* static Linear: ``QuantizeLinear`` with the calibrated scale (uint8, zero point 128: the int8 grid
  shifted) ``-> MatMulInteger -> Cast -> Mul (-> Add)``; ONNX Runtime runs ``MatMulInteger`` with
  its u8 kernels (a ``QuantizeLinear -> DequantizeLinear -> MatMul`` QDQ form with a float output
  is *not* fused and ran 3-30x slower);
* weights computed in float (weight-only Linear, every Conv2d, attention's ``out_proj``):
  ``DequantizeLinear`` on the int8 initializer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import torch
from onnxscript import opset18 as op

from lightning_compress.export import _ops

__all__ = ["translation_table"]

_FLOAT = onnx.TensorProto.FLOAT


def _zero_point(zero: int) -> Any:
    """The zero point of a weight stored as ``int8`` (``0``) or as ``uint8`` (``128``)."""
    if zero == 0:
        return op.Constant(value=onnx.helper.make_tensor("zero_i8", onnx.TensorProto.INT8, [], [0]))
    return op.Constant(value=onnx.helper.make_tensor("zero_u8", onnx.TensorProto.UINT8, [], [zero]))


def _finish(acc: Any, scale: Any, bias: Any) -> Any:
    out = op.Mul(op.Cast(acc, to=_FLOAT), scale)
    return out if bias is None else op.Add(out, bias)


def _matmul_integer(xq: Any, wt: Any, x_zero: Any, zero: int) -> Any:
    if zero == 0:  # int8 weights: no weight zero point (the form ONNX Runtime's own quantizer writes)
        return op.MatMulInteger(xq, wt, x_zero)
    return op.MatMulInteger(xq, wt, x_zero, _zero_point(zero))


def _dequantize_weight(q: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _linear_dynamic(x: Any, wt: Any, w_scale: Any, zero: int, bias: Any = None) -> Any:
    xq, x_scale, x_zero = op.DynamicQuantizeLinear(x)
    scale = op.Mul(x_scale, w_scale)
    return _finish(_matmul_integer(xq, wt, x_zero, zero), scale, bias)


def _linear_static(x: Any, wt: Any, w_scale: Any, zero: int, input_scale: Any, bias: Any = None) -> Any:
    x_zero = _zero_point(128)
    xq = op.QuantizeLinear(x, input_scale, x_zero)
    return _finish(_matmul_integer(xq, wt, x_zero, zero), op.Mul(input_scale, w_scale), bias)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``{torch operator: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    ops: Any = torch.ops.lightning_compress
    assert _ops.NAMESPACE == "lightning_compress"
    return {
        ops.dequantize_weight.default: _dequantize_weight,
        ops.linear_dynamic.default: _linear_dynamic,
        ops.linear_static.default: _linear_static,
    }
