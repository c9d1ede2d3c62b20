"""``nn.MultiheadAttention``'s call, taken once for the attention classes of ``core`` that recompute it.

:class:`~lightning_compress.core.prune.slim_attention.SlimMultiheadAttention` (heads removed) and
:class:`~lightning_compress.core.quant.transformer.Int8MultiheadAttention` (int8 projections) change
how attention computes, never what it is called with. Both derive from :class:`MultiheadAttentionCall`,
whose ``forward`` takes exactly ``nn.MultiheadAttention.forward``'s arguments (same names, same
defaults) and hands them, as one :class:`AttentionCall`, to the subclass's ``_attend``.

Pure torch.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn
from typing_extensions import override

__all__ = ["AttentionCall", "MultiheadAttentionCall"]


class AttentionCall(NamedTuple):
    """The arguments of one ``nn.MultiheadAttention`` call (see ``nn.MultiheadAttention.forward``)."""

    query: Tensor
    key: Tensor
    value: Tensor
    key_padding_mask: Tensor | None
    need_weights: bool
    attn_mask: Tensor | None
    average_attn_weights: bool
    is_causal: bool


class MultiheadAttentionCall(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose ``forward`` passes its arguments to :meth:`_attend`.

    Example:
        >>> import torch
        >>> class Echo(MultiheadAttentionCall):
        ...     def _attend(self, call):
        ...         return call.query, None
        >>> x = torch.ones(3, 4)
        >>> bool((Echo(4, 1)(x, x, x)[0] == x).all())
        True
    """

    @override
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The attention output (and weights, if asked) as the subclass's :meth:`_attend` computes them."""
        call = AttentionCall(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        return self._attend(call)

    def _attend(self, call: AttentionCall) -> tuple[Tensor, Tensor | None]:
        """``forward`` of the subclass, on the arguments of the call."""
        raise NotImplementedError(f"{type(self).__name__} does not compute attention.")
