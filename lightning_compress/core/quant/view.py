"""What model code sees as the ``weight`` of an int8 layer: a float-typed stand-in for the int8 tensor.

Model code reads ``layer.weight.dtype`` to cast its inputs (Hugging Face ``ViTEmbeddings`` casts the
pixels to ``projection.weight.dtype``; about 160 modeling files in transformers read a weight's
dtype) and ``layer.weight.device`` to place new tensors. If it saw ``torch.int8`` there it would
cast a float input to int8 and compute garbage. So the ``weight`` *attribute* of an int8 layer is an
:class:`Int8WeightView`: a tensor subclass with the layer's shape, device and **float** dtype, that
holds no float copy (creating one costs a few microseconds and no memory). Its metadata
(``dtype``, ``device``, ``shape``, ``is_floating_point()``) is free; any operation on it (a
product, ``.clone()``, ``== 0``...) runs on the dequantized weight, so code that computes with
``layer.weight`` directly gets the right numbers too.

The int8 tensor itself stays the layer's ``weight`` *buffer* (``layer._buffers["weight"]``,
also :attr:`~lightning_compress.core.quant.modules.Int8Module.int8_weight`): that is what the
layer computes with, what ``state_dict()`` holds (``torch.int8``) and what artifacts store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from lightning_compress.core.quant.primitives import dequantize

__all__ = ["Int8WeightView"]


class Int8WeightView(Tensor):
    """A float-typed view of an int8 weight with its scales; reads as ``dtype``, computes dequantized.

    Args:
        qweight: the int8 tensor (any strides: a transposed view is fine).
        scale: its float scales, one (``[1]``) or one per slice along ``axis``.
        axis: the dimension of ``qweight`` the scales run along.
        dtype: the float dtype to report (the layer's compute dtype).

    Example:
        >>> q = torch.tensor([[2, -4]], dtype=torch.int8)
        >>> w = Int8WeightView(q, torch.tensor([0.5]), 0, torch.float32)
        >>> w.dtype, w.shape, w.is_floating_point()
        (torch.float32, torch.Size([1, 2]), True)
        >>> (w * 2).tolist(), w.dequantize().dtype
        ([[2.0, -4.0]], torch.float32)
    """

    _qweight: Tensor
    _scale: Tensor
    _axis: int

    @staticmethod
    def __new__(cls, qweight: Tensor, scale: Tensor, axis: int, dtype: torch.dtype) -> Int8WeightView:  # noqa: D102
        view: Int8WeightView = Tensor._make_wrapper_subclass(
            cls, qweight.shape, strides=qweight.stride(), dtype=dtype, device=qweight.device, requires_grad=False
        )
        view._qweight = qweight
        view._scale = scale
        view._axis = axis
        return view

    def __init__(self, qweight: Tensor, scale: Tensor, axis: int, dtype: torch.dtype) -> None:
        super().__init__()

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @property
    def int8(self) -> Tensor:
        """The int8 tensor this view stands for (no copy)."""
        return self._qweight

    def dequantize(self) -> Tensor:
        """The float weight, ``scale * int8``, in this view's dtype (a new tensor)."""
        return dequantize(self._qweight, self._scale, axis=self._axis, dtype=self.dtype)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"Int8WeightView(int8 {tuple(self.shape)} with {self._scale.numel()} scale(s), reads as {self.dtype},"
            f" device={self.device})"
        )

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        args, kwargs = tree_map_only(Int8WeightView, lambda v: v.dequantize(), (args, kwargs or {}))
        return func(*args, **kwargs)

    def __tensor_flatten__(self) -> tuple[list[str], tuple[int, torch.dtype]]:
        return ["_qweight", "_scale"], (self._axis, self.dtype)

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, Tensor], meta: tuple[int, torch.dtype], outer_size: Any, outer_stride: Any
    ) -> Int8WeightView:
        return Int8WeightView(inner["_qweight"], inner["_scale"], meta[0], meta[1])
