"""Packing of sparse tensors in an artifact: a bitmask of the nonzero entries plus the nonzero values.

A tensor with enough exact zeros is *packed* when that is smaller than storing it as it is: a
bitmask of its nonzero entries (8 per byte, the first entry in the lowest bit) plus the nonzero
values in order. A float ``-0.0`` counts as a zero (it loads as ``+0.0``). Used by
:mod:`~lightning_compress.core.serialize`.

Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["pack_bits", "unpack_bits"]

_PACK_OVERHEAD = 128  # bytes a second stored tensor costs in the zip container, roughly


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into ``uint8``, 8 entries per byte (flattened; entry ``i`` in bit ``i % 8``).

    Example:
        >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True]))
        tensor([13,  1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` flags as a flat bool tensor.

    Example:
        >>> unpack_bits(torch.tensor([13, 1], dtype=torch.uint8), 9).tolist()
        [True, False, True, True, False, False, False, False, True]
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def _nonzero_mask(t: Tensor) -> Tensor:
    return t != 0  # a -0.0 is a zero (it loads as +0.0); artifacts that kept it as a value still load


def _compact(t: Tensor) -> Tensor:
    """The tensor on the CPU, owning exactly its own bytes (``torch.save`` writes a view's whole storage)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _encode(t: Tensor) -> tuple[str, Any]:
    t = _compact(t)
    dense = t.numel() * t.element_size()
    if t.numel() < 64 or t.dtype == torch.bool:
        return "tensors", t
    mask = _nonzero_mask(t)
    nnz = int(mask.sum())
    packed = math.ceil(t.numel() / 8) + nnz * t.element_size()
    if packed + _PACK_OVERHEAD >= dense:
        return "tensors", t
    return "packed", {
        "mask": pack_bits(mask),
        "values": t.reshape(-1)[mask.reshape(-1)].clone(),
        "shape": list(t.shape),
    }


def _decode(entry: Mapping[str, Any]) -> Tensor:
    """A checked packed entry as a dense tensor (``values`` scattered where the mask has a bit)."""
    shape = [int(s) for s in entry["shape"]]
    values: Tensor = entry["values"]
    numel = math.prod(shape)
    out = torch.zeros(numel, dtype=values.dtype)
    out[unpack_bits(entry["mask"], numel)] = values
    return out.reshape(shape)
