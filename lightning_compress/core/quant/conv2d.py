"""``Int8Conv2d``: ``nn.Conv2d`` (grouped and depthwise included) with an int8 weight.

A static float32 convolution computes on the integer codes of its input and weight
(:meth:`Int8Conv2d._integer_forward`): their sums come from oneDNN's int8 convolution on CPUs where
that is exact (:mod:`~lightning_compress.core.quant.onednn`: VNNI, AMX) and from ``F.conv2d`` on
the codes elsewhere, the same numbers either way. Otherwise it computes with its dequantized weight
and ``F.conv2d``: on the CPU we measured an unfold + ``torch._int_mm`` convolution 2.5-15x slower
than the float one, while dequantizing adds 0-17 % to the float convolution (see
``benchmarks/int8_latency.py`` and the quantization docs).
In ``mode="static"`` it also holds the calibrated scales of its input and of its output
(``input_scale``, ``output_scale``) and puts both on their int8 grid (``q = clamp(round(x / s),
-127, 127)``, read back as ``s * q``) around the float convolution, whose bias is then rounded to
the grid of the int32 product (:func:`~lightning_compress.core.quant.primitives.bias_on_grid`; in
eager float32 the sum is the integer one, as an int8 kernel computes it):
what the exported ONNX model computes, where ONNX Runtime fuses the quantized input, the int8
weight and the quantized output into one ``QLinearConv``. A scale of 0 (an artifact written before
these scales existed) leaves that side in float.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair
from typing_extensions import Self, override

from lightning_compress.core.quant.base import Int8Module
from lightning_compress.core.quant.onednn import conv_kernel, conv_sums
from lightning_compress.core.quant.primitives import QMAX, bias_counts, bias_on_grid, on_grid
from lightning_compress.core.quant.straight_through import needs_grad, straight_through

__all__ = ["Int8Conv2d"]


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
    CPU than an int8 unfold product); the int8 storage is what makes it small. A static layer puts
    its input and its output on the int8 grids of ``input_scale`` and ``output_scale``.

    Example:
        >>> import torch
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
        static = mode in self._static_input_modes
        super().__init__((out_channels, in_channels // groups, kh, kw), bias, mode, per_channel, static_input=static)
        self.register_buffer("output_scale", torch.zeros(()) if static else None)
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

    output_scale: Tensor | None
    _static_input_modes = ("static",)
    _float32_buffers = ("weight_scale", "input_scale", "output_scale")

    @override
    @classmethod
    def _from_float(cls, module: nn.Conv2d, mode: str, per_channel: bool, input_scale: Tensor | None) -> Self:
        """``module``: an ``nn.Conv2d``; ``input_scale`` is needed for ``"static"``.

        A static layer's ``output_scale`` starts at 0 (its output stays float) until :meth:`set_output_scale`.
        """
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
        return new._filled(module.weight, module.bias, input_scale)

    @torch.no_grad()
    def set_output_scale(self, scale: Tensor) -> None:
        """Set the calibrated scale of a static layer's output (0-d; 0 leaves the output in float)."""
        if self.output_scale is None:
            raise ValueError(f"Only a static int8 convolution has an `output_scale`; this one is {self.mode!r}.")
        self.output_scale = scale.detach().to(device=self.int8_weight.device, dtype=torch.float32).reshape(())

    @override
    @torch.no_grad()
    def configure(self, mode: str, per_channel: bool) -> None:
        super().configure(mode, per_channel)
        if mode in self._static_input_modes and self.output_scale is None:
            self.output_scale = torch.zeros((), device=self.int8_weight.device)
        elif mode not in self._static_input_modes:
            self.output_scale = None

    @property
    def kernel(self) -> str:
        """How it computes float32 inputs here: one of :data:`~lightning_compress.core.quant.onednn.CONV_KERNELS`.

        ``"onednn_u8s8"``: a static layer's integer sums from oneDNN's int8 convolution; ``"conv_codes"``:
        from ``F.conv2d`` on the codes (the same numbers); ``"dequant"``: the dequantized weight
        (``dynamic``, ``weight_only``).
        """
        return conv_kernel(self)

    def quantize_input(self, x: Tensor) -> Tensor:
        """``x`` on this layer's input grid, as :meth:`forward` puts it (``x`` itself unless the layer is static).

        Rounding a tensor that is already on the grid leaves it as it is, so a block may put its
        input on the grid once for this layer and its other readers
        (:mod:`~lightning_compress.core.quant.residual`).
        """
        return _on_grid(x, self.input_scale)

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None and needs_grad(self, x):
            return straight_through(self, x)  # static: the dequantized convolution's gradients
        return self._int8_forward(x)

    def _dequantized_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """The float convolution whose gradients a static layer passes (dequantized weight, bias as it is)."""
        weight = self.dequantize_weight(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _int8_forward(self, x: Tensor) -> Tensor:
        exact = self._integer_forward(x)
        if exact is not None:
            return exact
        weight = self.dequantize_weight(x.dtype)
        bias: Tensor | None = self.bias
        if bias is not None and self.input_scale is not None:  # static: the int32 bias QLinearConv adds
            bias = bias_on_grid(bias, self.input_scale, self.weight_scale)
        bias = None if bias is None else bias.to(x.dtype)
        x = _on_grid(x, self.input_scale)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
            out = F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        else:
            out = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return _on_grid(out, self.output_scale, inplace=not out.requires_grad)  # a fresh output: in place

    def _integer_forward(self, x: Tensor) -> Tensor | None:
        """A static float32 call as an int8 kernel computes it: integer codes, then one rescale; else ``None``.

        The input's codes ``clamp(round(x / s_x), -127, 127)`` and the weight's int8 codes go into
        ``F.conv2d`` as float32 integers, whose products and sums are exact while the accumulator
        stays below 2^24; the bias is added as its integer count of the product step
        (:func:`~lightning_compress.core.quant.primitives.bias_on_grid`'s count), and the sum is
        scaled once, by ``s_x * s_w / s_y`` (float32, per channel) onto the output's codes, or by
        ``s_x * s_w`` for a float output: the arithmetic of ONNX Runtime's ``QLinearConv``, so that
        the exported file computes the same codes (the float form, the dequantized input times the
        dequantized weight, rounds its partial sums, and a sum near a half step can land on the
        other code: measured on resnet18, this halves the difference to ONNX Runtime). Not while
        compiling or exporting (data-dependent branches), for other dtypes, or without a positive
        input scale: those take the float form, which equals this one up to float rounding. The
        sums come from oneDNN's int8 convolution where :func:`~lightning_compress.core.quant.onednn.conv_sums`
        applies (the same numbers, faster), else from ``F.conv2d`` on the codes.
        """
        sx, sy = self.input_scale, self.output_scale
        if sx is None or x.dtype is not torch.float32 or torch.compiler.is_compiling():
            return None
        if torch.compiler.is_exporting() or not bool(sx > 0):
            return None
        codes = torch.div(x, sx).round_().clamp_(-QMAX, QMAX)
        acc = conv_sums(self, codes)  # oneDNN's int8 convolution where it is exact (core.quant.onednn)
        if acc is None:
            if self.padding_mode != "zeros":
                codes = F.pad(codes, self._pad_twice, mode=self.padding_mode)
            padding = 0 if self.padding_mode != "zeros" else self.padding
            weight = self.int8_weight.to(torch.float32)
            acc = F.conv2d(codes, weight, None, self.stride, padding, self.dilation, self.groups)
        shape = (1, -1, 1, 1)
        rest: Tensor | None = None  # float bias of the channels an int32 count cannot carry
        if self.bias is None:
            step = (sx * self.weight_scale.to(torch.float32)).reshape(-1).expand(self.out_channels)
        else:
            bias = self.bias.detach().to(torch.float32)
            step, count, usable = bias_counts(bias, sx, self.weight_scale)
            acc.add_(torch.where(usable, count, 0.0).reshape(shape))
            rest = None if bool(usable.all()) else torch.where(usable, 0.0, bias)
        if sy is not None and bool(sy > 0):
            out = acc.mul_((step / sy).reshape(shape))
            if rest is not None:
                out.add_((rest / sy).reshape(shape))
            return out.round_().clamp_(-QMAX, QMAX).mul_(sy)
        out = acc.mul_(step.reshape(shape))
        return out if rest is None else out.add_(rest.reshape(shape))

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


def _on_grid(x: Tensor, scale: Tensor | None, inplace: bool = False) -> Tensor:
    """``scale * clamp(round(x / scale), -127, 127)`` in ``x``'s dtype; ``x`` itself without a positive scale.

    The same arithmetic as QAT's fake quantization of an input (``core.quant.fake``), so that a
    converted layer computes what the last QAT forward computed.
    """
    if scale is None:
        return x
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # no data-dependent branch in a graph
        # `on_grid` divides by 1 where the scale is 0 and then multiplies by 1: `where` keeps x there.
        return torch.where(scale > 0, on_grid(x, scale), x)
    if not bool(scale > 0):
        return x
    return on_grid(x, scale, inplace)
