"""ONNX patterns for the custom operators of :mod:`lightning_compress.export._ops` (written with onnxscript).

Each pattern is the one ONNX Runtime's CPU graph optimizer fuses into its fast int8 kernel (checked
by dumping the optimized graph with ``SessionOptions.optimized_model_filepath``; see :doc:`/deploying`):

* dynamic Linear: ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add)``, fused into
  ``com.microsoft.DynamicQuantizeMatMul`` (the pattern ``onnxruntime.quantization.quantize_dynamic``
  writes);
* static Linear: the QDQ form ``QuantizeLinear -> DequantizeLinear`` of the activation with the
  calibrated scale (uint8, zero point 128: the symmetric int8 grid shifted), ``DequantizeLinear``
  of the int8 weight (with its zero point: without one it is not fused), ``Gemm`` without bias,
  then ``Add`` of the float bias: fused into ``com.microsoft.QGemm`` with a float output (an input
  of another rank is reshaped to 2-d around the ``Gemm``). Rejected by measurement: a ``MatMul``
  in that place is not fused (the weight is dequantized on every call, 2-4x slower); a ``Gemm``
  with its bias is fused into ``FusedGemm`` with a following ``Relu`` *before* the QDQ fusion
  (float, weight dequantized per call); ``QuantizeLinear -> MatMulInteger -> Cast -> Mul`` runs
  unfused (1.2-1.4x of ``quantize_static``); int8 activations (zero point 0) are not fused;
* static Conv2d: ``QuantizeLinear -> DequantizeLinear`` of the input and of the output with their
  calibrated scales (uint8, zero point 128) around a ``Conv`` of the ``DequantizeLinear`` of the int8
  weight: fused into ``QLinearConv`` (measured: without the output's pair the ``Conv`` stays float,
  with the weight dequantized per call);
* weights computed in float (weight-only Linear, attention's projections): ``DequantizeLinear`` on
  the int8 initializer; on the weight of a Conv2d whose input is float (dynamic and weight-only
  modes) it is rewritten after the export as ``Cast -> Mul``
  (:mod:`lightning_compress.export._rewrite`), which ONNX Runtime folds into a float weight.
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


def _rank(x: Any) -> int | None:
    shape = getattr(x, "shape", None)
    try:
        return None if shape is None else len(shape)
    except TypeError:  # an unknown rank
        return None


def _quantize_activation(x: Any, scale: Any) -> Any:
    zero = _zero_point(128)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def _linear_static(x: Any, wt: Any, w_scale: Any, w_zero: Any, input_scale: Any, bias: Any = None) -> Any:
    flat = x
    if _rank(x) != 2:  # Gemm is 2-d: [..., K] -> [-1, K] and back
        minus_one: Any = op.Constant(value=onnx.helper.make_tensor("minus_one", onnx.TensorProto.INT64, [1], [-1]))
        flat = op.Reshape(x, op.Concat(minus_one, op.Shape(wt, start=0, end=1), axis=0))
    out = op.Gemm(_quantize_activation(flat, input_scale), op.DequantizeLinear(wt, w_scale, w_zero, axis=1))
    if flat is not x:
        lead: Any = op.Shape(x, start=0, end=-1)
        out = op.Reshape(out, op.Concat(lead, op.Shape(wt, start=1, end=2), axis=0))
    return out if bias is None else op.Add(out, bias)


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``{torch operator: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=...)``."""
    ops: Any = torch.ops.lightning_compress
    assert _ops.NAMESPACE == "lightning_compress"
    return {
        ops.dequantize_weight.default: _dequantize_weight,
        ops.linear_dynamic.default: _linear_dynamic,
        ops.linear_static.default: _linear_static,
        ops.quantize_activation.default: _quantize_activation,
    }
