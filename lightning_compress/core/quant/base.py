"""The storage and bookkeeping every int8 layer shares: :class:`Int8Module` and :data:`MODES`.

An int8 layer keeps its weight in a buffer named ``weight`` of dtype ``torch.int8`` with the float
layer's shape, a float32 ``weight_scale`` buffer (``[out]`` per channel, ``[1]`` per tensor), the
float ``bias`` and, for a layer that quantizes its input in ``mode="static"``, an ``input_scale``.
The layers themselves are in :mod:`~lightning_compress.core.quant.modules` (``Int8Linear``),
:mod:`~lightning_compress.core.quant.conv2d`, :mod:`~lightning_compress.core.quant.embedding`,
:mod:`~lightning_compress.core.quant.conv1d` and :mod:`~lightning_compress.core.quant.transformer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self, override

from lightning_compress.core.quant.primitives import dequantize, quantize, weight_scales
from lightning_compress.core.quant.view import Int8WeightView

__all__ = ["MODES", "Int8Module"]

MODES: tuple[str, ...] = ("dynamic", "static", "weight_only")
"""The ways an int8 layer can compute."""


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

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        mode: str = "dynamic",
        per_channel: bool = True,
        input_scale: Tensor | None = None,
    ) -> Self:
        """Quantize a trained float layer into this int8 class.

        Args:
            module: the float layer this class stands for: ``nn.Linear`` (or a subclass) for
                ``Int8Linear``, ``nn.Conv2d`` for ``Int8Conv2d``, ``nn.Embedding`` for ``Int8Embedding``,
                Hugging Face ``Conv1D`` for ``Int8Conv1D``; ``Int8InProjMultiheadAttention`` converts an
                ``nn.MultiheadAttention`` in place and returns it.
            mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
            per_channel: one weight scale per output channel; otherwise one for the whole weight.
            input_scale: the calibrated input scale, needed for ``mode="static"`` by the layers that
                quantize their input (``Int8Linear``, ``Int8Conv1D``); the others ignore it (a
                convolution, an embedding and attention compute in float).

        Raises:
            ValueError: for an unknown ``mode``, a static layer without ``input_scale``, or an
                embedding with ``max_norm`` (:func:`~lightning_compress.core.quant.embedding.embedding_refusal`).
        """
        return cls._from_float(module, mode, per_channel, input_scale)

    @classmethod
    def _from_float(cls, module: Any, mode: str, per_channel: bool, input_scale: Tensor | None) -> Self:
        """What :meth:`from_float` does for this class (each int8 class has its own)."""
        raise NotImplementedError(f"{cls.__name__} is not made from a float layer.")

    def _filled(self, weight: Tensor, bias: Tensor | None, input_scale: Tensor | None) -> Self:
        """This new layer holding ``weight`` (the float weight, stored layout) in int8, on its device."""
        self._set_from_float(weight, bias, input_scale)
        return self.to(device=weight.device)

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
