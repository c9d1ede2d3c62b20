"""``Int8Embedding``: ``nn.Embedding`` with an int8 table and one scale per row.

A lookup gathers the int8 rows and their scales and multiplies them, so only the looked-up rows are
ever dequantized: the table costs a quarter of its float32 bytes in memory and in the artifact. Every
``mode`` computes the same way (there is no product to run in int8); ``mode`` is recorded for the
artifact. ``padding_idx`` is kept (its row is zero in a trained table and stays exactly zero);
``max_norm`` renormalizes looked-up rows *in place*, which an int8 table cannot do, so a layer with
``max_norm`` is refused (left float by the conversion, with the reason).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import Self, override

from lightning_compress.core.quant.base import Int8Module

__all__ = ["Int8Embedding", "embedding_forward_is_own", "embedding_refusal"]


def embedding_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot become an :class:`Int8Embedding` (``None`` if it can)."""
    if getattr(module, "max_norm", None) is not None:
        return "Embedding with max_norm renormalizes its weight in place, which an int8 table cannot"
    return None


def embedding_forward_is_own(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` is ``nn.Embedding.forward`` itself."""
    return type(module).forward is nn.Embedding.forward


class Int8Embedding(Int8Module):
    """An ``nn.Embedding`` whose table is stored as int8 with one float32 scale per row (or one in all).

    Args:
        num_embeddings: rows of the table.
        embedding_dim: size of a row.
        padding_idx: as ``nn.Embedding`` (kept for the record; the forward pass is a plain lookup).
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"`` (all compute alike).
        per_channel: one scale per row; otherwise one for the whole table.

    Example:
        >>> emb = nn.Embedding(10, 4, padding_idx=0)
        >>> q = Int8Embedding.from_float(emb)
        >>> q.int8_weight.dtype, tuple(q.weight_scale.shape), q.weight.dtype
        (torch.int8, (10,), torch.float32)
        >>> ids = torch.tensor([[0, 3, 9]])
        >>> bool((q(ids) - emb(ids)).abs().max() < 0.02), bool((q(ids)[0, 0] == 0).all())
        (True, True)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        mode: str = "dynamic",
        per_channel: bool = True,
    ) -> None:
        super().__init__((num_embeddings, embedding_dim), False, mode, per_channel, static_input=False)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx

    @override
    @classmethod
    def _from_float(cls, module: nn.Embedding, mode: str, per_channel: bool, input_scale: Tensor | None) -> Self:
        """``module``: an ``nn.Embedding`` without ``max_norm`` (see :func:`embedding_refusal`); no ``input_scale``."""
        why = embedding_refusal(module)
        if why is not None:
            raise ValueError(f"Cannot make an Int8Embedding: {why} (max_norm={module.max_norm}).")
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, mode, per_channel)
        return new._filled(module.weight, None, None)

    @override
    def forward(self, input: Tensor) -> Tensor:
        q = self._buffers["weight"]
        assert q is not None  # registered in __init__
        rows = F.embedding(input, q)  # int8 [..., dim]
        scale = self.weight_scale
        if scale.numel() == 1:
            out = rows.to(torch.float32) * scale
        else:
            out = rows.to(torch.float32) * F.embedding(input, scale.unsqueeze(1))
        return out.to(self.compute_dtype)

    @override
    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return f"{text}, {self._extra()}"
