"""Export forms: small modules that stand in for int8 layers while a model is exported.

An export form reads the int8 layer's raw state (the int8 ``weight`` buffer, ``weight_scale``,
``input_scale``, ``bias``, ``mode``, ``per_channel``), never its ``forward``, and computes through
the custom operators of :mod:`lightning_compress.export._ops`, so that the exported graph holds
one node per layer with the int8 weight as an initializer. The forms are built fresh for each
export and thrown away afterwards; the model keeps its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_compress.export import _ops

__all__ = ["ExportConv2d", "ExportLinear", "ExportOptions", "raw_int8_weight"]

WEIGHT_DTYPES: tuple[str, ...] = ("int8", "uint8")
"""How int8 weights are stored in the file: as they are, or shifted by 128 with zero point 128."""


@dataclass(frozen=True)
class ExportOptions:
    """Choices that hold for every layer of one export.

    Attributes:
        weight_dtype: ``"int8"`` stores the weights as they are (ONNX Runtime's u8 x s8 kernels);
            ``"uint8"`` stores ``weight + 128`` with zero point 128 (its u8 x u8 kernels, which do
            not saturate on x86 CPUs without VNNI; the same values, one byte each).
    """

    weight_dtype: str = "int8"

    @property
    def zero(self) -> int:
        """The weight zero point: 0 for ``int8`` storage, 128 for ``uint8``."""
        return 0 if self.weight_dtype == "int8" else 128


def raw_int8_weight(layer: nn.Module) -> Tensor:
    """The int8 weight buffer of an int8 layer, read from ``_buffers`` (its ``.weight`` may be a float view)."""
    weight = layer._buffers.get("weight")
    if weight is None or weight.dtype != torch.int8:
        raise ValueError(f"{type(layer).__name__} has no int8 `weight` buffer to export.")
    return weight.detach()


def _stored(q: Tensor, options: ExportOptions) -> Tensor:
    if options.weight_dtype == "int8":
        return q.contiguous().clone()
    return (q.to(torch.int16) + 128).to(torch.uint8).contiguous()


def _scale(layer: nn.Module) -> Tensor:
    """``weight_scale`` as float32: ``[out]`` per channel, 0-d per tensor (ONNX's per-tensor form)."""
    scale = layer._buffers["weight_scale"]
    assert scale is not None
    scale = scale.detach().to(device="cpu", dtype=torch.float32).clone()
    return scale if bool(getattr(layer, "per_channel", True)) else scale.reshape(())


def _zero_point(scale: Tensor, options: ExportOptions) -> Tensor:
    """The weight zero point, shaped like its scale (ONNX ``DequantizeLinear`` wants them alike)."""
    dtype = torch.int8 if options.weight_dtype == "int8" else torch.uint8
    return torch.full(scale.shape, options.zero, dtype=dtype)


def _copy_sizes(form: nn.Module, layer: nn.Module, names: tuple[str, ...]) -> None:
    """Give ``form`` the layer's own size attributes that it has, for model code that reads them.

    Whisper's decoder reads ``embed_positions.num_embeddings``; a form without it failed to export.
    """
    for name in names:
        if name in layer.__dict__:
            value = layer.__dict__[name]
            setattr(form, name, tuple(value) if isinstance(value, list) else value)


_LINEAR_SIZES = ("in_features", "out_features", "nf")
_CONV_SIZES = ("in_channels", "out_channels", "kernel_size")
_EMBEDDING_SIZES = ("num_embeddings", "embedding_dim", "padding_idx")


def _bias(layer: nn.Module) -> Tensor | None:
    bias = getattr(layer, "bias", None)
    return None if bias is None else bias.detach().to(device="cpu", dtype=torch.float32).clone()


class ExportLinear(nn.Module):
    """An int8 Linear in export form: ``[in, out]`` int8 weight, scales, bias, and its mode.

    ``weight`` (a property) is the dequantized ``[out, in]`` float weight, for parents that read it
    (``nn.MultiheadAttention`` hands ``out_proj.weight`` to its functional form); in the file it is
    a ``DequantizeLinear`` of the same int8 initializer.
    """

    weight_t: Tensor
    weight_scale: Tensor
    weight_zero: Tensor
    input_scale: Tensor | None
    bias: Tensor | None

    def __init__(self, layer: nn.Module, options: ExportOptions) -> None:
        super().__init__()
        q = raw_int8_weight(layer)
        if q.dim() != 2:
            raise ValueError(f"Expected a 2-d int8 Linear weight, but got shape {tuple(q.shape)}.")
        self.mode = str(getattr(layer, "mode", "dynamic"))
        self.zero = options.zero
        self.out_features = int(q.shape[0])
        _copy_sizes(self, layer, _LINEAR_SIZES)
        self.register_buffer("weight_t", _stored(q.cpu().t(), options))
        self.register_buffer("weight_scale", _scale(layer))
        self.register_buffer("weight_zero", _zero_point(self.weight_scale, options))
        self.register_buffer("bias", _bias(layer))
        input_scale = layer._buffers.get("input_scale") if self.mode == "static" else None
        if self.mode == "static" and input_scale is None:
            raise ValueError("A static int8 Linear has no `input_scale` to export.")
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().cpu().float().reshape(()).clone()
        )

    @property
    def weight(self) -> Tensor:
        """The dequantized ``[out, in]`` weight."""
        return _ops.dequantize_weight(self.weight_t, self.weight_scale, self.weight_zero, 1).t()

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dynamic":
            return _ops.linear_dynamic(x, self.weight_t, self.weight_scale, self.zero, self.bias)
        if self.mode == "static":
            assert self.input_scale is not None
            return _ops.linear_static(
                x, self.weight_t, self.weight_scale, self.weight_zero, self.input_scale, self.bias
            )
        out = torch.matmul(x, _ops.dequantize_weight(self.weight_t, self.weight_scale, self.weight_zero, 1))
        return out if self.bias is None else out + self.bias


class ExportConv2d(nn.Module):
    """An int8 Conv2d in export form: ``F.conv2d`` with the dequantized int8 weight (as in PyTorch).

    A static layer with its calibrated scales also puts its input and its output on their int8 grids
    (the QDQ form ONNX Runtime fuses into ``QLinearConv``). Otherwise the weight's
    ``DequantizeLinear`` is rewritten as ``Cast -> Mul`` after the export
    (:func:`lightning_compress.export._rewrite.foldable_conv_weights`), which ONNX Runtime folds into
    a float weight when the session loads.

    ``weight`` (a property) is the dequantized float weight, for model code that reads it (Hugging
    Face's ``ViTEmbeddings`` casts the pixels to ``projection.weight.dtype``); a read of its dtype or
    shape leaves nothing in the file.
    """

    weight_q: Tensor
    weight_scale: Tensor
    weight_zero: Tensor
    bias: Tensor | None
    input_scale: Tensor | None
    output_scale: Tensor | None

    def __init__(self, layer: nn.Module, options: ExportOptions) -> None:
        super().__init__()
        conv: Any = layer
        self.zero = options.zero
        self.register_buffer("weight_q", _stored(raw_int8_weight(layer).cpu(), options))
        self.register_buffer("weight_scale", _scale(layer))
        self.register_buffer("weight_zero", _zero_point(self.weight_scale, options))
        self.register_buffer("bias", _bias(layer))
        self.stride = tuple(conv.stride)
        self.padding = conv.padding
        self.dilation = tuple(conv.dilation)
        self.groups = int(conv.groups)
        self.padding_mode = str(conv.padding_mode)
        _copy_sizes(self, layer, _CONV_SIZES)
        self.pad_twice = list(getattr(layer, "_pad_twice", [0, 0, 0, 0]))
        scales = [layer._buffers.get(name) for name in ("input_scale", "output_scale")]
        quantized = getattr(layer, "mode", None) == "static" and all(t is not None and bool(t > 0) for t in scales)
        for name, t in zip(("input_scale", "output_scale"), scales, strict=True):
            value = t.detach().cpu().float().reshape(()).clone() if quantized and t is not None else None
            self.register_buffer(name, value)

    @property
    def weight(self) -> Tensor:
        """The dequantized ``[out, in / groups, kh, kw]`` weight."""
        return _ops.dequantize_weight(self.weight_q, self.weight_scale, self.weight_zero, 0)

    def quantize_input(self, x: Tensor) -> Tensor:
        """``x`` on the input grid, as :meth:`forward` puts it (``QuantizeLinear -> DequantizeLinear``); else ``x``."""
        return x if self.input_scale is None else _ops.quantize_activation(x, self.input_scale)

    @override
    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if self.input_scale is not None:
            x = _ops.quantize_activation(x, self.input_scale)
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad_twice, mode=self.padding_mode)
            out = F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        else:
            out = F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out if self.output_scale is None else _ops.quantize_activation(out, self.output_scale)


class ExportEmbedding(nn.Module):
    """An int8 Embedding in export form: ``Gather`` of the int8 rows, times the ``Gather`` of their scales.

    ``weight`` (a property) is the dequantized ``[num, dim]`` table, for model code that reads it
    (Hugging Face's ``CLIPTextEmbeddings`` reads ``position_embedding.weight.shape``); a read of its
    dtype or shape leaves nothing in the file.
    """

    weight_q: Tensor
    weight_scale: Tensor

    def __init__(self, layer: nn.Module, options: ExportOptions) -> None:
        super().__init__()
        self.register_buffer("weight_q", raw_int8_weight(layer).cpu().contiguous().clone())
        scale = _scale(layer)
        self.register_buffer("weight_scale", scale.reshape(-1, 1) if scale.dim() else scale)
        _copy_sizes(self, layer, _EMBEDDING_SIZES)

    @property
    def weight(self) -> Tensor:
        """The dequantized ``[num, dim]`` table."""
        return self.weight_q.to(torch.float32) * self.weight_scale

    @override
    def forward(self, input: Tensor) -> Tensor:
        rows = F.embedding(input, self.weight_q).to(torch.float32)
        if self.weight_scale.dim() == 0:
            return rows * self.weight_scale
        return rows * F.embedding(input, self.weight_scale)
