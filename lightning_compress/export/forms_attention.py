"""The export form of an attention module whose packed ``in_proj_weight`` is int8.

It is a shallow copy of the module (same submodules and parameters, its own dictionaries) whose
class hands the attention a ``DequantizeLinear`` of the int8 projection, and whose int8 ``out_proj``
is replaced by its own export form. The original module is not changed.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.quant.transformer import Int8MultiheadAttention
from lightning_compress.export import _ops
from lightning_compress.export.forms import ExportOptions, _zero_point

__all__ = ["export_inproj_attention"]


class _ExportInProjAttention(Int8MultiheadAttention):
    in_proj_q: Tensor
    in_proj_scale: Tensor
    in_proj_zero: Tensor

    def _in_proj_for(self, dtype: object) -> Tensor | None:
        return _ops.dequantize_weight(self.in_proj_q, self.in_proj_scale, self.in_proj_zero, 0)

    @override
    def extra_repr(self) -> str:
        return "export form of an int8 in_proj attention"


def export_inproj_attention(layer: nn.Module, options: ExportOptions) -> nn.Module:
    """The export form of an ``Int8InProjMultiheadAttention`` (its int8 ``out_proj`` included)."""
    from lightning_compress.export.registry import form_of

    q = layer._buffers.get("in_proj_weight")
    scale = layer._buffers.get("in_proj_weight_scale")
    if q is None or scale is None or not hasattr(Int8MultiheadAttention, "_in_proj_for"):
        raise ValueError(f"{type(layer).__name__} has no int8 `in_proj_weight` with `in_proj_weight_scale` to export.")
    form = copy.copy(layer)
    form.__dict__ = dict(layer.__dict__)
    form._parameters = dict(layer._parameters)
    form._buffers = {k: v for k, v in layer._buffers.items() if k not in ("in_proj_weight", "in_proj_weight_scale")}
    form._modules = dict(layer._modules)
    form.__class__ = _ExportInProjAttention
    form.register_buffer("in_proj_q", q.detach().cpu().contiguous().clone())
    in_proj_scale = scale.detach().cpu().float().clone()
    form.register_buffer("in_proj_scale", in_proj_scale)
    form.register_buffer("in_proj_zero", _zero_point(in_proj_scale, ExportOptions("int8")))
    out_proj = layer._modules.get("out_proj")
    if out_proj is not None:
        form._modules["out_proj"] = form_of("out_proj", out_proj, options, missing_ok=True)
    return form
