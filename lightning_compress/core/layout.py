"""How a weight is stored: which axis holds the output channels, and which projections it packs.

Masks and penalties reason about a weight as ``(out, in, *kernel)``: output channels on dim 0, the
reduction (input) axis next, as ``nn.Linear`` and every ``nn.ConvNd`` store it. Two common layers do not:

* Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2 and its family) stores ``[in, out]``:
  its layout is ``WeightLayout(out_axis=1)``;
* ``nn.MultiheadAttention`` packs its query, key and value projections into one ``in_proj_weight`` of
  shape ``(3 * embed_dim, embed_dim)``: ``WeightLayout(blocks=(E, E, E))``. A channel or N:M decision
  is made per projection, so each block is handled as a layer of its own.

:func:`canonical_blocks` views a weight as its ``(out, in, ...)`` blocks and :func:`from_canonical_blocks`
turns tensors of those shapes (masks, gradients) back into the stored layout. A standard layout is a
no-op both ways. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "STANDARD",
    "LayoutPlan",
    "WeightLayout",
    "canonical_blocks",
    "from_canonical_blocks",
    "from_out_first",
    "out_first",
]


@dataclass(frozen=True)
class WeightLayout:
    """Where the output channels of a stored weight are.

    Attributes:
        out_axis: the dimension that indexes output channels (``0`` for ``Linear``/``Conv``, ``1`` for
            Hugging Face ``Conv1D``). Moving it to the front gives the ``(out, in, ...)`` view.
        blocks: sizes, along the output axis, of the separate projections packed into the tensor
            (``(E, E, E)`` for a ``MultiheadAttention`` ``in_proj_weight``); ``None`` for one projection.
    """

    out_axis: int = 0
    blocks: tuple[int, ...] | None = None

    @property
    def is_standard(self) -> bool:
        """Whether the tensor is already one ``(out, in, ...)`` projection."""
        return self.out_axis == 0 and (self.blocks is None or len(self.blocks) <= 1)


STANDARD = WeightLayout()
"""The layout of ``nn.Linear``, ``nn.ConvNd`` and ``nn.Embedding`` weights."""


def out_first(weight: Tensor, layout: WeightLayout | None) -> Tensor:
    """A view of ``weight`` with its output axis first (``weight`` itself for ``out_axis=0``).

    Example:
        >>> w = torch.arange(6.0).view(2, 3)  # a Conv1D weight: 2 inputs, 3 outputs
        >>> out_first(w, WeightLayout(out_axis=1)).shape
        torch.Size([3, 2])
    """
    if layout is None or layout.out_axis == 0:
        return weight
    return weight.movedim(layout.out_axis, 0)


def from_out_first(tensor: Tensor, layout: WeightLayout | None) -> Tensor:
    """The inverse of :func:`out_first`: a view with the leading axis moved back to ``out_axis``."""
    if layout is None or layout.out_axis == 0:
        return tensor
    return tensor.movedim(0, layout.out_axis)


def canonical_blocks(weight: Tensor, layout: WeightLayout | None) -> list[Tensor]:
    """``weight`` as the ``(out, in, ...)`` views of the projections it holds (one for most layers).

    Example:
        >>> w = torch.arange(12.0).view(6, 2)  # in_proj_weight of MultiheadAttention(2, 1)
        >>> [tuple(b.shape) for b in canonical_blocks(w, WeightLayout(blocks=(2, 2, 2)))]
        [(2, 2), (2, 2), (2, 2)]
    """
    view = out_first(weight, layout)
    if layout is None or layout.blocks is None or len(layout.blocks) <= 1:
        return [view]
    if sum(layout.blocks) != view.shape[0]:
        raise ValueError(f"blocks {layout.blocks} do not add up to the {view.shape[0]} output channels")
    return list(view.split_with_sizes(list(layout.blocks), dim=0))


def from_canonical_blocks(blocks: Sequence[Tensor], layout: WeightLayout | None) -> Tensor:
    """Tensors shaped like :func:`canonical_blocks` of a weight, joined back in the weight's layout (contiguous).

    Example:
        >>> w = torch.randn(4, 3)
        >>> layout = WeightLayout(out_axis=1)
        >>> torch.equal(from_canonical_blocks(canonical_blocks(w, layout), layout), w)
        True
    """
    joined = blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=0)
    return from_out_first(joined, layout).contiguous()


class LayoutPlan:
    """Splits dicts of weights (masks, statistics) into ``(out, in, ...)`` projections and joins results back.

    Mask functions see each projection as a layer of its own, with its output channels on dim 0; a
    packed weight's blocks come in order, right where the weight was, so ties are still broken by
    layer order then position. When every layout is standard the plan hands the dicts through as they are.

    Args:
        names: the weights' names, in order.
        layouts: ``name -> layout``; names missing (or ``None``) are standard.

    Example:
        >>> w = {"c_attn": torch.arange(6.0).view(2, 3)}  # a Conv1D weight, [in, out]
        >>> plan = LayoutPlan(w, {"c_attn": WeightLayout(out_axis=1)})
        >>> {k: tuple(v.shape) for k, v in plan.split(w).items()}
        {'c_attn': (3, 2)}
        >>> torch.equal(plan.join(plan.split(w))["c_attn"], w["c_attn"])
        True
    """

    def __init__(self, names: Iterable[str], layouts: Mapping[str, WeightLayout | None] | None = None) -> None:
        self.names = list(names)
        given = layouts or {}
        self.layouts = {n: lay for n in self.names if (lay := given.get(n)) is not None and not lay.is_standard}
        self._keys = {n: self._block_keys(n, lay) for n, lay in self.layouts.items()}

    @staticmethod
    def _block_keys(name: str, layout: WeightLayout) -> list[str]:
        if layout.blocks is None or len(layout.blocks) <= 1:
            return [name]
        return [f"{name}\x00{i}" for i in range(len(layout.blocks))]  # "\x00" is in no module name

    @property
    def is_identity(self) -> bool:
        """Whether every weight is already one ``(out, in, ...)`` projection."""
        return not self.layouts

    def split(self, tensors: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Tensors shaped like their weights, as the ``(out, in, ...)`` views of each projection."""
        if self.is_identity:
            return tensors
        out: dict[str, Tensor] = {}
        for name, tensor in tensors.items():
            layout = self.layouts.get(name)
            if layout is None:
                out[name] = tensor
            else:
                out.update(zip(self._keys[name], canonical_blocks(tensor, layout), strict=True))
        return out

    def repeat(self, values: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Per-weight values that do not depend on the output axis (statistics of the input), once per block."""
        if self.is_identity:
            return values
        out: dict[str, Tensor] = {}
        for name, value in values.items():
            for key in self._keys.get(name, [name]):
                out[key] = value
        return out

    def join(self, pieces: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Results per projection (masks), joined back into tensors shaped like the weights."""
        if self.is_identity:
            return dict(pieces)
        return {
            name: from_canonical_blocks([pieces[k] for k in self._keys[name]], self.layouts[name])
            if name in self.layouts
            else pieces[name]
            for name in self.names
            if name in pieces or name in self._keys
        }
