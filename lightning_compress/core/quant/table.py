"""The one table of int8 layers: which float layer type becomes which int8 type.

Every part of the package that needs to know "what does this float layer become in int8" or
"which int8 types exist" asks here: conversion (:mod:`~lightning_compress.core.quant.convert`),
serialization (the ``kind`` stored per layer in an artifact), the report and the ONNX exporter.
A new int8 layer is one :func:`register_int8` call (the torchao handler pattern):

.. code-block:: python

    register_int8(Int8Kind("Int8Conv1D", Conv1D, Int8Conv1D, forward_is_own=...))

Entries are looked up along the float module's MRO, so a subclass of ``nn.Linear`` (such as
``NonDynamicallyQuantizableLinear``) finds the ``Linear`` entry; whether its ``forward`` is still
the base class's (so that the int8 version computes the same thing) is the entry's
``forward_is_own`` check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_compress.core.attention import MultiheadAttentionCall
from lightning_compress.core.linear_forwards import computes_linear
from lightning_compress.core.quant.base import Int8Module
from lightning_compress.core.quant.conv2d import Int8Conv2d
from lightning_compress.core.quant.embedding import Int8Embedding, embedding_forward_is_own, embedding_refusal
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.quant.transformer import Int8InProjMultiheadAttention, Int8MultiheadAttention

__all__ = [
    "INT8_TABLE",
    "Int8Kind",
    "int8_kind_for",
    "int8_kind_named",
    "int8_kind_of",
    "int8_types",
    "register_int8",
]


def _conv2d_forward_is_own(module: nn.Module) -> bool:
    cls: Any = type(module)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _mha_forward_is_own(module: nn.Module) -> bool:
    cls: Any = type(module)
    if cls.forward is nn.MultiheadAttention.forward:
        return True
    # Int8MultiheadAttention (and its subclasses that change only the projection): its forward is the
    # shared MultiheadAttentionCall.forward, so what it computes is its `_attend`.
    return (
        cls.forward is MultiheadAttentionCall.forward
        and getattr(cls, "_attend", None) is Int8MultiheadAttention._attend
    )


def _mha_refusal(module: nn.Module) -> str | None:
    if not getattr(module, "_qkv_same_embed_dim", True):
        return "separate q/k/v projection weights (kdim/vdim differ from embed_dim) stay float"
    return None


@dataclass(frozen=True)
class Int8Kind:
    """One row of the table.

    Attributes:
        name: the name stored in artifacts (``"Int8Linear"``); never change it for an entry.
        float_type: the float layer type (subclasses match too).
        int8_type: its int8 version, with a ``from_float(module, mode, per_channel, input_scale)``.
        forward_is_own: whether a float module of this kind computes what ``float_type.forward`` does
            (a subclass that overrides ``forward`` is left float: its int8 version would lose the override).
        static_input: whether ``mode="static"`` quantizes this layer's input with a calibrated scale.
        static_output: whether ``mode="static"`` also quantizes its output with a calibrated scale
            (a convolution: ONNX Runtime fuses it into ``QLinearConv`` only then).
        refusal: optional check of a float module's settings (an ``nn.Embedding`` with ``max_norm``).
    """

    name: str
    float_type: type[nn.Module]
    int8_type: type[Int8Module]
    forward_is_own: Callable[[nn.Module], bool]
    static_input: bool = False
    static_output: bool = False
    refusal: Callable[[nn.Module], str | None] | None = None
    """Why a float module of this kind cannot be converted (``None``: it can); it then stays float with that reason."""


INT8_TABLE: dict[type[nn.Module], Int8Kind] = {}
"""``{float type: Int8Kind}``, in registration order."""


def register_int8(kind: Int8Kind) -> Int8Kind:
    """Add (or replace) the entry for ``kind.float_type``; returns ``kind``."""
    INT8_TABLE[kind.float_type] = kind
    return kind


_OPTIONAL_DONE: set[str] = set()


def _register_optional() -> None:
    """Register the entries of optional libraries that are imported by now (never imports them itself).

    Hugging Face ``Conv1D`` joins the table the first time the table is asked anything after
    ``transformers.pytorch_utils`` was imported (a model holding a ``Conv1D`` has imported it).
    """
    if "conv1d" not in _OPTIONAL_DONE and "transformers.pytorch_utils" in sys.modules:
        conv1d_type = getattr(sys.modules["transformers.pytorch_utils"], "Conv1D", None)
        _OPTIONAL_DONE.add("conv1d")
        if isinstance(conv1d_type, type) and issubclass(conv1d_type, nn.Module):
            from lightning_compress.core.quant.conv1d import Int8Conv1D, conv1d_forward_is_own

            register_int8(Int8Kind("Int8Conv1D", conv1d_type, Int8Conv1D, conv1d_forward_is_own, static_input=True))


def int8_kind_for(module: nn.Module) -> Int8Kind | None:
    """The entry whose float type is the nearest base class of ``module``'s type, or ``None``.

    Example:
        >>> int8_kind_for(nn.Linear(2, 2)).name, int8_kind_for(nn.ReLU())
        ('Int8Linear', None)
    """
    _register_optional()
    for cls in type(module).__mro__:
        kind = INT8_TABLE.get(cls)
        if kind is not None:
            return kind
    return None


def int8_kind_named(name: str) -> Int8Kind | None:
    """The entry stored in artifacts as ``name``, or ``None``."""
    _register_optional()
    for kind in INT8_TABLE.values():
        if kind.name == name:
            return kind
    return None


def int8_kind_of(layer: nn.Module) -> Int8Kind | None:
    """The entry whose int8 type ``layer`` is (exactly), or ``None``."""
    _register_optional()
    for kind in INT8_TABLE.values():
        if type(layer) is kind.int8_type:
            return kind
    return None


def int8_types() -> tuple[type[Int8Module], ...]:
    """Every int8 layer type in the table (for ``isinstance`` checks)."""
    _register_optional()
    return tuple(kind.int8_type for kind in INT8_TABLE.values())


register_int8(Int8Kind("Int8Linear", nn.Linear, Int8Linear, computes_linear, static_input=True))
register_int8(
    Int8Kind("Int8Conv2d", nn.Conv2d, Int8Conv2d, _conv2d_forward_is_own, static_input=True, static_output=True)
)
register_int8(
    Int8Kind(
        "Int8InProjMultiheadAttention",
        nn.MultiheadAttention,
        Int8InProjMultiheadAttention,
        _mha_forward_is_own,
        refusal=_mha_refusal,
    )
)
register_int8(
    Int8Kind("Int8Embedding", nn.Embedding, Int8Embedding, embedding_forward_is_own, refusal=embedding_refusal)
)
