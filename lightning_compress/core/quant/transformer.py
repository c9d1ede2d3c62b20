"""Let PyTorch's transformer modules run with int8 layers inside them.

``nn.MultiheadAttention`` never calls its ``out_proj`` module: it hands ``out_proj.weight`` to
``F.multi_head_attention_forward``, and its eval fast path and that of
``nn.TransformerEncoderLayer`` (``torch._transformer_encoder_layer_fwd``) read the ``weight`` of
``out_proj``, ``linear1`` and ``linear2`` directly. An int8 buffer there would crash or compute
nonsense. :func:`adapt_parents` therefore gives such parents a small subclass (same state, same
``state_dict`` keys) that takes PyTorch's own slow path and hands attention the dequantized
``out_proj`` weight, and turns off ``nn.TransformerEncoder``'s nested-tensor fast path. The other
int8 layers (``linear1``, ``linear2``) are then called as modules and compute in int8.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import Self, override

from lightning_compress.core.attention import AttentionCall, MultiheadAttentionCall
from lightning_compress.core.quant.base import MODES, Int8Module
from lightning_compress.core.quant.hf import guard_save_pretrained
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.quant.primitives import dequantize, quantize, weight_scales
from lightning_compress.core.quant.view import Int8WeightView

__all__ = ["Int8InProjMultiheadAttention", "Int8MultiheadAttention", "Int8TransformerEncoderLayer", "adapt_parents"]


def _canonical_masks(
    padding_mask: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype, names: tuple[str, str]
) -> tuple[Tensor | None, Tensor | None]:
    """Both masks as PyTorch's own modules prepare them: bool masks become float ``-inf``/``0`` of ``dtype``."""
    padding_name, attn_name = names
    padding_mask = F._canonical_mask(
        mask=padding_mask,
        mask_name=padding_name,
        other_type=F._none_or_dtype(attn_mask),
        other_name=attn_name,
        target_type=dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name=attn_name, other_type=None, other_name="", target_type=dtype, check_other=False
    )
    return padding_mask, attn_mask


class Int8MultiheadAttention(MultiheadAttentionCall):
    """``nn.MultiheadAttention`` whose ``out_proj`` is an :class:`Int8Linear`.

    Always takes PyTorch's reference (slow) path, with the ``out_proj`` weight dequantized for the
    call. Its ``in_proj_weight`` stays a float parameter here; :class:`Int8InProjMultiheadAttention`
    stores it in int8 as well.
    """

    @override
    def _attend(self, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal = call
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("An int8 MultiheadAttention does not take nested tensors.")
        out_proj = self.out_proj
        out_weight = out_proj.dequantize_weight(query.dtype) if isinstance(out_proj, Int8Linear) else out_proj.weight
        in_proj_weight = self._in_proj_for(query.dtype)
        out_bias = out_proj.bias
        is_batched = query.dim() == 3
        key_padding_mask, attn_mask = _canonical_masks(
            key_padding_mask, attn_mask, query.dtype, ("key_padding_mask", "attn_mask")
        )
        if self.batch_first and is_batched:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        attn_output, attn_weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            out_weight,
            out_bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.batch_first and is_batched:
            return attn_output.transpose(1, 0), attn_weights
        return attn_output, attn_weights

    def _in_proj_for(self, dtype: torch.dtype) -> Tensor | None:
        """The packed input projection to compute with (``None`` when q/k/v have their own weights)."""
        return self.in_proj_weight


class Int8InProjMultiheadAttention(Int8MultiheadAttention, Int8Module):
    """``nn.MultiheadAttention`` whose packed ``in_proj_weight`` is int8 (its ``out_proj`` may be int8 too).

    The ``in_proj_weight`` buffer (``state_dict`` key unchanged) is ``torch.int8`` ``[3E, E]`` with an
    ``in_proj_weight_scale`` ``[3E]``: one scale per row (``per_channel``), or one per projection
    (query, key, value) repeated over its rows. The ``in_proj_weight`` attribute is a float-typed
    :class:`~lightning_compress.core.quant.view.Int8WeightView`; the attention computes with the
    dequantized projection on PyTorch's reference path. Made in place from a float module by
    :meth:`from_float` (the table's ``Int8InProjMultiheadAttention`` entry), never built from scratch.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(2, 5, 8)
        >>> ref = mha(x, x, x)[0]
        >>> q = Int8InProjMultiheadAttention.from_float(mha, per_channel=False)
        >>> q.state_dict()["in_proj_weight"].dtype, tuple(q.in_proj_weight_scale.unique().shape)
        (torch.int8, (3,))
        >>> bool((q(x, x, x)[0] - ref).abs().max() < 0.05), q.in_proj_weight.dtype
        (True, torch.float32)
    """

    in_proj_weight_scale: Tensor
    _float32_buffers = ("in_proj_weight_scale",)

    @property
    def in_proj_weight(self) -> Tensor:  # type: ignore[override]
        """A float-typed view of the int8 packed projection."""
        buffers = self.__dict__.get("_buffers", {})
        q = buffers.get("in_proj_weight")
        if q is None:
            raise AttributeError("in_proj_weight")
        return Int8WeightView(q, buffers["in_proj_weight_scale"], 0, self.compute_dtype)

    @override
    def _in_proj_for(self, dtype: torch.dtype) -> Tensor | None:
        q = self._buffers["in_proj_weight"]
        assert q is not None  # set by from_float
        return dequantize(q, self.in_proj_weight_scale, axis=0, dtype=dtype)

    @override
    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        out = self._in_proj_for(dtype)
        assert out is not None
        return out

    @property
    @override
    def int8_weight(self) -> Tensor:
        return self._buffers["in_proj_weight"]  # type: ignore[return-value]

    @override
    def configure(self, mode: str, per_channel: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
        self.mode = mode
        self.per_channel = bool(per_channel)

    @override
    @classmethod
    @torch.no_grad()
    def _from_float(
        cls, module: nn.MultiheadAttention, mode: str, per_channel: bool, input_scale: Tensor | None
    ) -> Self:
        """Quantize ``module``'s packed ``in_proj_weight`` in place and return ``module``, now of this class."""
        if isinstance(module, Int8InProjMultiheadAttention):
            module.configure(mode, per_channel)
            return module  # type: ignore[return-value]  # already int8: configured, whatever its class
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {MODES}, but got {mode!r}.")
        weight = module.in_proj_weight
        if not module._qkv_same_embed_dim or not isinstance(weight, Tensor):
            raise TypeError("Only a MultiheadAttention with one packed `in_proj_weight` has an int8 version.")
        size = module.embed_dim
        if per_channel:
            scale = weight_scales(weight, True)
        else:
            blocks = torch.split(weight.detach(), size)
            scale = torch.cat([weight_scales(block, False).expand(size) for block in blocks])
        q = quantize(weight.detach(), scale, axis=0).contiguous()
        del module._parameters["in_proj_weight"]
        module._buffers["in_proj_weight"] = q
        module._buffers["in_proj_weight_scale"] = scale.to(weight.device).contiguous()
        module._buffers["input_scale"] = None
        module.__class__ = cls
        new: Self = module  # type: ignore[assignment]
        new.mode = mode
        new.per_channel = bool(per_channel)
        new.compute_dtype = weight.dtype
        return new

    @override
    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, int8 in_proj_weight, {self._extra()}"


class Int8TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always takes the reference path, so int8 layers are called as modules."""

    @override
    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        src_key_padding_mask, src_mask = _canonical_masks(
            src_key_padding_mask, src_mask, src.dtype, ("src_key_padding_mask", "src_mask")
        )
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


def _has_int8(*modules: nn.Module | None) -> bool:
    return any(isinstance(m, Int8Module) for m in modules)


@torch.no_grad()
def adapt_parents(model: nn.Module) -> list[str]:
    """Make the transformer modules of ``model`` that hold int8 layers take a path that works with them.

    Swaps the class of an ``nn.MultiheadAttention`` with an int8 ``out_proj`` to
    :class:`Int8MultiheadAttention`, of an ``nn.TransformerEncoderLayer`` with an int8
    ``linear1``/``linear2``/``out_proj`` to :class:`Int8TransformerEncoderLayer` (state and keys are
    unchanged), and turns off the nested-tensor path of an ``nn.TransformerEncoder`` above them.
    A Hugging Face model that holds int8 layers gets a ``save_pretrained`` that refuses with what to
    do instead (:func:`~lightning_compress.core.quant.hf.guard_save_pretrained`).

    Returns:
        The names of the modules that were changed.
    """
    changed: list[str] = []
    for name, module in model.named_modules():
        if type(module) is nn.MultiheadAttention and _has_int8(module.out_proj):
            module.__class__ = Int8MultiheadAttention
            changed.append(name)
        elif type(module) is nn.TransformerEncoderLayer and _has_int8(
            module.linear1, module.linear2, module.self_attn, module.self_attn.out_proj
        ):
            module.__class__ = Int8TransformerEncoderLayer
            changed.append(name)
    guard_save_pretrained(model, (Int8Module,))
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.TransformerEncoder)
            and getattr(module, "use_nested_tensor", False)
            and any(isinstance(m, Int8TransformerEncoderLayer) for m in module.layers)
        ):
            module.use_nested_tensor = False
            changed.append(name)
    return changed
