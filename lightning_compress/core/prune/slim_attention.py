"""Attention blocks after head removal: the attributes their code reads, and a slim ``MultiheadAttention``.

``nn.MultiheadAttention`` assumes its inner width equals ``embed_dim`` (its functional forward and
the fused ``TransformerEncoderLayer`` path both check it), so a model that lost heads gets its
attention modules' class switched to :class:`SlimMultiheadAttention`: the same parameters under
the same names, ``embed_dim`` (the input and output width) unchanged, and a forward that runs
``num_heads * head_dim`` inner channels with ``scaled_dot_product_attention``. Hugging Face and
timm attention reshape with ``-1`` or read ``num_heads``, so updating their attributes is enough.

Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.core.attention import AttentionCall, MultiheadAttentionCall

__all__ = ["SlimMultiheadAttention", "shrink_attention"]


class SlimMultiheadAttention(MultiheadAttentionCall):
    """``nn.MultiheadAttention`` whose heads were partly removed (inner width ``num_heads * head_dim``).

    Only the packed projection (``in_proj_weight``) and no ``bias_k`` / ``bias_v`` are supported,
    which is what :func:`~lightning_compress.remove_channels` produces. ``_qkv_same_embed_dim`` is
    ``False`` on it so that ``nn.TransformerEncoderLayer`` never takes its fused path, which
    assumes the full width.
    """

    @override
    def _attend(self, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward`` with ``num_heads * head_dim`` inner channels (same arguments)."""
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal = call
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, N, E) from here on
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, hd = self.num_heads, self.head_dim
        inner = heads * hd
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else torch.split(b, inner)
        wq, wk, wv = torch.split(w, inner)
        q = F.linear(query, wq, bq).reshape(length, batch * heads, hd).transpose(0, 1)
        k = F.linear(key, wk, bk).reshape(source, batch * heads, hd).transpose(0, 1)
        v = F.linear(value, wv, bv).reshape(source, batch * heads, hd).transpose(0, 1)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, q.dtype, is_causal)
        scores = torch.bmm(q * (hd**-0.5), k.transpose(1, 2))
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length, batch, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        attn = weights.view(batch, heads, length, source)
        if average_attn_weights:
            attn = attn.mean(dim=1)
        return out, attn.squeeze(0) if unbatched else attn


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    is_causal: bool,
) -> Tensor | None:
    mask: Tensor | None = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        if m.dim() == 2:
            m = m.unsqueeze(0).expand(batch * heads, length, source)
        mask = m
    if key_padding_mask is not None:
        k = key_padding_mask
        if k.dtype == torch.bool:
            k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
        k = k.to(dtype).view(batch, 1, 1, source).expand(batch, heads, 1, source).reshape(batch * heads, 1, source)
        mask = k if mask is None else mask + k
    return mask


def make_slim_mha(module: nn.MultiheadAttention, heads: int) -> None:
    """Switch ``module`` to :class:`SlimMultiheadAttention` with ``heads`` heads (its tensors already cut)."""
    module.__class__ = SlimMultiheadAttention
    module.num_heads = heads
    module._qkv_same_embed_dim = False


def shrink_attention(model: nn.Module, name: str, removed: int) -> None:
    """Update the attention module ``name`` after ``removed`` of its heads were cut out."""
    module: Any = model.get_submodule(name) if name else model
    set_heads(module, _heads(module) - removed)


def _heads(module: nn.Module) -> int:
    for attr in ("num_heads", "num_attention_heads"):
        value: Any = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"{type(module).__name__} has no head count")


def set_heads(module: Any, heads: int) -> None:
    """Give the attention ``module`` ``heads`` heads: every attribute its forward reads."""
    if isinstance(module, nn.MultiheadAttention):
        make_slim_mha(module, heads)
    elif hasattr(module, "num_attention_heads"):  # Hugging Face BERT / ViT self-attention
        module.num_attention_heads = heads
        module.all_head_size = heads * int(module.attention_head_size)
    else:  # timm Attention
        module.num_heads = heads
        if hasattr(module, "attn_dim"):
            module.attn_dim = heads * int(module.head_dim)
