"""Int8 layers: :class:`Int8Linear` and :class:`Int8Conv2d`.

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
  calibrated range saturate.
* ``"weight_only"``: int8 storage, float compute (the weight is dequantized for each call).

A convolution always computes with its dequantized weight and ``F.conv2d`` (``mode`` is recorded
for the artifact): on the CPU we measured an unfold + ``torch._int_mm`` convolution 2.5-15x slower
than the float one, while dequantizing adds 0-17 % to the float convolution
(see ``benchmarks/int8_latency.py`` and the quantization docs).

On CUDA ``torch._int_mm`` needs more than 16 rows and ``K``, ``N`` multiples of 8: fewer rows are
padded with zero rows; other shapes fall back to the dequantized weight in the input's dtype. On
devices without ``torch._int_mm`` (e.g. MPS) the same fallback is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from typing_extensions import override

from lightning_compress.core.quant import kernels
from lightning_compress.core.quant.primitives import dequantize, quantize, quantize_rows, weight_scales
from lightning_compress.core.quant.view import Int8WeightView

__all__ = ["MODES", "Int8Conv2d", "Int8Linear", "int8_mm"]

MODES: tuple[str, ...] = ("dynamic", "static", "weight_only")
"""The ways an int8 layer can compute."""

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


class Int8Module(nn.Module):
    """Shared storage and bookkeeping of the int8 layers.

    The int8 weight is the buffer ``weight`` (``self._buffers["weight"]``, also :attr:`int8_weight`):
    it is what the layer computes with and what ``state_dict()`` and artifacts hold, as
    ``torch.int8``. The ``weight`` *attribute* is an
    :class:`~lightning_compress.core.quant.view.Int8WeightView` that reports the layer's float
    :attr:`compute_dtype` (and its device and float shape), so that model code that casts its inputs
    to ``layer.weight.dtype`` keeps computing in float; any operation on it runs on the dequantized
    weight. ``layer.half()`` / ``.to(torch.bfloat16)`` change :attr:`compute_dtype`, never the int8
    weight or the float32 scales.
    """

    weight_scale: Tensor
    input_scale: Tensor | None
    bias: nn.Parameter | None
    compute_dtype: torch.dtype
    """The float dtype the layer stands in for (that of the float layer it was made from)."""

    _float32_buffers: tuple[str, ...] = ("weight_scale", "input_scale")
    """Buffers that stay float32 whatever dtype the model is cast to."""

    _weight_axis: int = 0
    """The axis of the float weight (as ``.weight`` shows it) that the scales run along."""

    def __init__(
        self, weight_shape: tuple[int, ...], bias: bool, mode: str, per_channel: bool, static_input: bool
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
        self.mode = mode
        self.per_channel = bool(per_channel)
        self.compute_dtype = torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(weight_shape[0] if per_channel else 1))
        # A static Linear owns its input scale; other layers have none (it is not in their state_dict).
        self.register_buffer("input_scale", torch.zeros(()) if static_input else None)
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None

    @torch.no_grad()
    def _set_from_float(self, weight: Tensor, bias: Tensor | None, input_scale: Tensor | None) -> None:
        scale = weight_scales(weight, self.per_channel)
        self._buffers["weight"] = quantize(weight, scale, axis=0).contiguous()
        self.weight_scale = scale.to(weight.device)
        if weight.is_floating_point():
            self.compute_dtype = weight.dtype
        if self.bias is not None and bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        if self.input_scale is not None:
            if input_scale is None:
                raise ValueError("A static int8 layer needs an `input_scale`.")
            self.input_scale = input_scale.detach().to(device=weight.device, dtype=torch.float32).reshape(())

    _static_input_modes: tuple[str, ...] = ()

    @torch.no_grad()
    def configure(self, mode: str, per_channel: bool) -> None:
        """Switch to another mode / scale granularity; the int8 weight and scales are then to be loaded."""
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
        device = self.int8_weight.device
        self.mode = mode
        if bool(per_channel) != self.per_channel:
            self.per_channel = bool(per_channel)
            self.weight_scale = torch.zeros(self.int8_weight.shape[0] if per_channel else 1, device=device)
        wants_input = mode in self._static_input_modes
        if wants_input and self.input_scale is None:
            self.input_scale = torch.zeros((), device=device)
        elif not wants_input:
            self.input_scale = None

    @property
    def int8_weight(self) -> Tensor:
        """The stored int8 weight (the ``weight`` buffer itself, no copy), row-major ``[out, ...]``."""
        return self._buffers["weight"]  # type: ignore[return-value]

    @property
    def weight(self) -> Tensor:
        """A float-typed :class:`~lightning_compress.core.quant.view.Int8WeightView` of the int8 weight."""
        buffers: dict[str, Tensor | None] = self.__dict__.get("_buffers") or {}
        q, scale = buffers.get("weight"), buffers.get("weight_scale")
        if q is None or scale is None:  # before `register_buffer` in __init__: no attribute yet
            raise AttributeError("weight")
        view = q.t() if self._weight_axis == 1 else q
        return Int8WeightView(view, scale, self._weight_axis, self.compute_dtype)

    @weight.setter
    def weight(self, value: Tensor) -> None:  # reached only when `weight` is not a buffer yet
        self.register_buffer("weight", value)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight this layer computes with: ``weight_scale * weight`` in ``dtype``, stored layout."""
        return dequantize(self.int8_weight, self.weight_scale, axis=0, dtype=dtype)

    @override
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        # `.half()` / `.to(torch.bfloat16)` must move the scales but never round them: keep them float32.
        kept = {name: t for name in self._float32_buffers if (t := self._buffers.get(name)) is not None}
        # The compute dtype follows what `fn` does to a float tensor (`.half()` -> float16, `.cuda()` -> same).
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if isinstance(probe, Tensor) and probe.is_floating_point():
            self.compute_dtype = probe.dtype
        result = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, saved in kept.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = saved.to(device=moved.device)
        return result

    def _extra(self) -> str:
        granularity = "per_channel" if self.per_channel else "per_tensor"
        return f"mode={self.mode!r}, {granularity}"


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

    @classmethod
    def from_float(
        cls,
        module: nn.Linear,
        mode: str = "dynamic",
        per_channel: bool = True,
        input_scale: Tensor | None = None,
    ) -> Int8Linear:
        """Quantize a trained ``nn.Linear`` (or subclass); ``input_scale`` is needed for ``"static"``."""
        new = cls(module.in_features, module.out_features, module.bias is not None, mode, per_channel)
        new._set_from_float(module.weight, module.bias, input_scale)
        return new.to(device=module.weight.device)

    @property
    def kernel(self) -> str:
        """How this layer computes on its device: one of :data:`~lightning_compress.core.quant.kernels.KERNELS`.

        Decided by :func:`~lightning_compress.core.quant.kernels.select_kernel` from the shape, the mode,
        the device and what this torch and CPU offer (float32 inputs; other dtypes use ``"dequant"``).
        """
        w = self._buffers["weight"]
        assert w is not None  # registered in __init__
        return kernels.select_kernel(self.in_features, self.out_features, self.mode, w.device)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "weight_only" or x.numel() == 0:
            return self._float_forward(x)
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
        if self.bias is None:
            out.mul_(self.weight_scale)
        else:
            out = torch.addcmul(self.bias.to(torch.float32), out, self.weight_scale)
        if self.mode == "static":  # rounding makes a NaN / inf finite: 0 * sum(row) puts it back, as in float
            out.add_(x2.sum(dim=1, keepdim=True).to(torch.float32).mul_(0.0))
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


def _reversed_padding_twice(
    padding: tuple[int, int] | str, kernel_size: tuple[int, int], dilation: tuple[int, int]
) -> list[int]:
    """The ``F.pad`` amounts (last dimension first) that ``nn.Conv2d`` uses for a non-zero padding mode."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        pads: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(padding) for _ in range(2)]


class Int8Conv2d(Int8Module):
    """A ``Conv2d`` (grouped and depthwise included) whose weight is stored as int8 with float scales.

    It computes with the dequantized weight and ``F.conv2d`` in every mode (measured faster on the
    CPU than an int8 unfold product); the int8 storage is what makes it small.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        >>> q = Int8Conv2d.from_float(conv)
        >>> x = torch.randn(2, 8, 5, 5)
        >>> q.int8_weight.dtype, bool((q(x) - conv(x)).abs().max() < 0.05)
        (torch.int8, True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        mode: str = "dynamic",
        per_channel: bool = True,
    ) -> None:
        kh, kw = _pair(kernel_size)
        super().__init__((out_channels, in_channels // groups, kh, kw), bias, mode, per_channel, static_input=False)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.stride = _pair(stride)
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        # What nn.Conv2d pads with before the convolution when padding_mode is not "zeros".
        self._pad_twice = _reversed_padding_twice(self.padding, self.kernel_size, self.dilation)

    @classmethod
    def from_float(
        cls,
        module: nn.Conv2d,
        mode: str = "dynamic",
        per_channel: bool = True,
        input_scale: Tensor | None = None,
    ) -> Int8Conv2d:
        """Quantize a trained ``nn.Conv2d``; ``input_scale`` is ignored (a convolution computes in float)."""
        padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        new = cls(
            module.in_channels,
            module.out_channels,
            _pair(module.kernel_size),
            _pair(module.stride),
            padding,
            _pair(module.dilation),
            module.groups,
            module.bias is not None,
            module.padding_mode,
            mode,
            per_channel,
        )
        new._set_from_float(module.weight, module.bias, None)
        return new.to(device=module.weight.device)

    @override
    def forward(self, x: Tensor) -> Tensor:
        weight = self.dequantize_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @override
    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride},"
            f" padding={self.padding}"
        )
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return f"{text}, {self._extra()}"
