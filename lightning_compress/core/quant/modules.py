"""Int8 layers: :class:`Int8Linear` here, and (re-exported) :class:`Int8Conv2d` and their base :class:`Int8Module`.

Both keep their weight in a buffer named ``weight`` of dtype ``torch.int8`` with the float layer's
shape (``[out, in]`` or ``[out, in / groups, kh, kw]``, row-major contiguous), a float32
``weight_scale`` buffer (``[out]`` per channel, ``[1]`` per tensor) and the float ``bias``. For a
Linear, ``weight.t()`` is then the column-major ``[K, N]`` operand that ``torch._int_mm`` runs
fastest with on CUDA, with no copy.

How they compute (``mode``):

* ``"dynamic"`` (Linear): each row of the input is quantized with its own scale at run time, the
  product is an int8 x int8 -> int32 ``torch._int_mm``, and the result is rescaled by
  ``row_scale * weight_scale`` and the bias added.
* ``"static"`` (Linear): like dynamic, but the input scale is a fixed ``input_scale`` found from
  calibration batches, so no reduction over the input is needed at run time; inputs beyond the
  calibrated range saturate, and the bias is rounded to the product's grid ``input_scale *
  weight_scale`` (:func:`~lightning_compress.core.quant.primitives.bias_on_grid`), as the int32
  bias of an int8 kernel is (the CPU's ``"float"`` kernel of a small layer computes the weight-only
  result instead: :mod:`~lightning_compress.core.quant.kernels`).
* ``"weight_only"``: int8 storage, float compute (the weight is dequantized for each call).

A convolution always computes with its dequantized weight and ``F.conv2d``
(:mod:`~lightning_compress.core.quant.conv2d`); the shared storage is in
:mod:`~lightning_compress.core.quant.base`.

On CUDA ``torch._int_mm`` needs more than 16 rows and ``K``, ``N`` multiples of 8: fewer rows are
padded with zero rows; other shapes fall back to the dequantized weight in the input's dtype. On
devices without ``torch._int_mm`` (e.g. MPS) the same fallback is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import Self, override

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.base import MODES
from lightning_compress.core.quant.base import Int8Module as Int8Module  # re-exported: it lived here
from lightning_compress.core.quant.conv2d import Int8Conv2d as Int8Conv2d  # re-exported: it lived here
from lightning_compress.core.quant.primitives import bias_on_grid, quantize, quantize_rows, restore_nonfinite_rows_
from lightning_compress.core.quant.straight_through import needs_grad, straight_through

__all__ = ["MODES", "Int8Linear", "int8_mm"]

_INT_MM_DEVICES = ("cpu", "cuda")
_CUDA_MIN_ROWS = 17


def int8_mm(xq: Tensor, weight: Tensor) -> Tensor | None:
    """``xq @ weight.t()`` in int32 through ``torch._int_mm``, or ``None`` where it cannot run.

    Args:
        xq: ``[M, K]`` int8 activations (made row-major contiguous here).
        weight: ``[N, K]`` int8 weight, row-major, so that ``weight.t()`` is column-major.

    Returns:
        ``[M, N]`` int32, or ``None`` when the device has no ``_int_mm`` or, on CUDA, ``K`` or ``N``
        is not a multiple of 8 (the caller then computes in floating point). On CUDA fewer than
        17 rows are padded with zero rows and the padding is cut off again.

    Example:
        >>> a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
        >>> w = torch.tensor([[1, 1, 1], [2, 0, -1]], dtype=torch.int8)
        >>> int8_mm(a, w)
        tensor([[ 2, -1]], dtype=torch.int32)
    """
    device = xq.device.type
    if device not in _INT_MM_DEVICES:
        return None
    xq = xq.contiguous()
    rows = xq.shape[0]
    if device == "cuda":
        k, n = weight.shape[1], weight.shape[0]
        if k % 8 or n % 8:
            return None
        if rows < _CUDA_MIN_ROWS:
            xq = F.pad(xq, (0, 0, 0, _CUDA_MIN_ROWS - rows))
            return torch._int_mm(xq, weight.t())[:rows]
    return torch._int_mm(xq, weight.t())


class Int8Linear(Int8Module):
    """A ``Linear`` whose weight is stored as int8 with float scales.

    Build one from a trained layer with :meth:`from_float`; the ``state_dict`` holds ``weight``
    (int8), ``weight_scale`` (float32), ``bias`` (float) and, for ``mode="static"``,
    ``input_scale``.

    Args:
        in_features: input size.
        out_features: output size.
        bias: whether the layer has a bias.
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
        per_channel: one weight scale per output feature; otherwise one for the whole matrix.

    Example:
        >>> layer = nn.Linear(16, 4)
        >>> q = Int8Linear.from_float(layer)
        >>> q.int8_weight.dtype, tuple(q.weight.shape), tuple(q.weight_scale.shape)
        (torch.int8, (4, 16), (4,))
        >>> q.weight.dtype  # what model code that casts its inputs to the weight's dtype sees
        torch.float32
        >>> x = torch.randn(8, 16)
        >>> bool((q(x) - layer(x)).abs().max() < 0.05)
        True
    """

    _static_input_modes = ("static",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "dynamic",
        per_channel: bool = True,
    ) -> None:
        super().__init__((out_features, in_features), bias, mode, per_channel, static_input=mode == "static")
        self.in_features = in_features
        self.out_features = out_features

    @override
    @classmethod
    def _from_float(cls, module: nn.Linear, mode: str, per_channel: bool, input_scale: Tensor | None) -> Self:
        """``module``: an ``nn.Linear`` (or subclass); ``input_scale`` is needed for ``"static"``."""
        new = cls(module.in_features, module.out_features, module.bias is not None, mode, per_channel)
        return new._filled(module.weight, module.bias, input_scale)

    @property
    def kernel(self) -> str:
        """How this layer computes on its device: one of :data:`~lightning_compress.core.quant.kernels.KERNELS`.

        Decided by :func:`~lightning_compress.core.quant.kernels.select_kernel` from the shape, the mode,
        the device and what this torch and CPU offer (float32 inputs; other dtypes use ``"dequant"``),
        and by :func:`~lightning_compress.core.quant.kernels.with_sparse` from how many weights are zero.
        """
        w = self._buffers["weight"]
        assert w is not None  # registered in __init__
        return kernels.with_sparse(kernels.select_kernel(self.in_features, self.out_features, self.mode, w.device), w)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "weight_only" or x.numel() == 0:
            return self._float_forward(x)
        if needs_grad(self, x) and not kernels.differentiable(self, x):
            return straight_through(self, x)  # the dequantized layer's gradients
        return self._int8_forward(x)

    def _dequantized_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The float layer whose gradients :meth:`forward` passes (``F.linear`` with the dequantized weight)."""
        return F.linear(x, self.dequantize_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    def _int8_forward(self, x: Tensor) -> Tensor:
        """The int8 output (no gradient of its own; :meth:`forward` adds the straight-through one)."""
        out = kernels.linear_forward(self, x)
        if out is not None:
            return out
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "static":
            assert self.input_scale is not None  # set by __init__ for static layers
            x_scale = self.input_scale
            xq = quantize(x2, x_scale)
        else:
            xq, x_scale = quantize_rows(x2)
        acc = int8_mm(xq, self._buffers["weight"])  # type: ignore[arg-type]
        if acc is None:
            return self._float_forward(x)
        # Two passes over the [M, N] result: int32 -> float32 times the row scales, then
        # bias + out * weight_scale.
        out = torch.mul(acc, x_scale)
        bias: Tensor | None = self.bias
        if bias is not None and self.mode == "static":  # the int32 bias of the product's grid
            bias = bias_on_grid(bias, x_scale, self.weight_scale)
        if bias is None:
            out.mul_(self.weight_scale)
        else:
            out = torch.addcmul(bias.to(torch.float32), out, self.weight_scale)
        if self.mode == "static":  # rounding makes a NaN / inf finite: put it back, as in float
            restore_nonfinite_rows_(out, x2)
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def _float_forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    @override
    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
            f" {self._extra()}"
        )
