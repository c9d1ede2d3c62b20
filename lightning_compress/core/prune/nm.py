"""The N:M pattern: keep ``N`` of every ``M`` consecutive weights along each output row's input axis.

``"2:4"`` is the semi-structured sparsity that sparse tensor cores run. Groups run along the
reduction axis of the layer seen as a matrix product (channels-last for convolutions), and a
gradual schedule climbs a staircase of kept weights per group (:func:`nm_keep_per_group`) that ends
exactly on N:M. Registered as the ``"N:M"`` family of the pattern table by
:mod:`~lightning_compress.core.prune.masks`, which re-exports the public names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_compress.core.prune.patterns import MaskPattern, prune_count, rank_pruned_last
from lightning_compress.core.prune.scores import magnitude_score

__all__ = ["nm_keep_per_group", "nm_masks", "parse_nm"]

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(method: str) -> tuple[int, int] | None:
    """``(N, M)`` for an N:M method such as ``"2:4"``, ``None`` for any other string.

    The numbers are not validated here (the callback checks ``0 < N < M``).

    Example:
        >>> parse_nm("2:4"), parse_nm("magnitude")
        ((2, 4), None)
    """
    match = _NM.match(method)
    return (int(match.group(1)), int(match.group(2))) if match else None


def nm_keep_per_group(sparsity: float, n: int, m: int) -> int:
    """Weights kept per group of ``m`` at ``sparsity`` on the way to N:M: ``m - round(sparsity * m)``, at least ``n``.

    A gradual schedule thus climbs a staircase (4:4, 3:4, 2:4 for ``"2:4"``) and ends exactly on N:M.

    Example:
        >>> [nm_keep_per_group(s, 2, 4) for s in (0.0, 0.1, 0.2, 0.4, 0.5)]
        [4, 4, 3, 2, 2]
    """
    return max(n, m - prune_count(sparsity, m))


def _reduction_last(weight: Tensor) -> Tensor:
    """The weight as ``(out, K)`` with the reduction axis last: ``(out, *kernel, in)`` flattened for convs."""
    if weight.dim() <= 2:
        return weight.reshape(weight.shape[0], -1)
    return weight.permute(0, *range(2, weight.dim()), 1).reshape(weight.shape[0], -1)


def _from_reduction_last(flat: Tensor, shape: torch.Size) -> Tensor:
    if len(shape) <= 2:
        return flat.reshape(shape)
    permuted = flat.reshape(shape[0], *shape[2:], shape[1])
    return permuted.permute(0, len(shape) - 1, *range(1, len(shape) - 1))


@torch.no_grad()
def nm_masks(
    weights: Mapping[str, Tensor],
    n: int,
    m: int,
    keep: int | None = None,
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep the ``keep`` (default ``n``) largest ``|w|`` in every ``m`` consecutive weights along the input.

    Groups run along the reduction axis of the layer seen as a matrix product: the input features
    of a ``Linear``; for a convolution the weight is read as ``(out, *kernel, in / groups)``
    (channels-last, as sparse tensor cores read it), so a group spans ``m`` consecutive input
    channels at one kernel position whenever ``in / groups`` is a multiple of ``m``, and otherwise
    continues across kernel positions. A depthwise 3x3 filter (9 weights) thus forms groups of
    4, 4 and 1. A trailing partial group of ``r < m`` weights keeps at most ``min(r, keep)``.
    Scope does not apply: every group meets the pattern on its own.

    Args:
        weights: ``name -> weight`` with at least one dimension.
        n: nonzeros allowed per group at the end (``0 < n < m``).
        m: group size.
        keep: nonzeros kept per group now (``n <= keep <= m``), see :func:`nm_keep_per_group`.
        previous: masks from the last update; entries they prune stay pruned.

    Returns:
        ``name -> bool mask`` (``True`` = kept).

    Example:
        >>> import torch
        >>> w = {"fc": torch.tensor([[4.0, -1.0, 3.0, 0.5, 9.0, -8.0]])}
        >>> nm_masks(w, 2, 4)["fc"].int().tolist()
        [[1, 0, 1, 0, 1, 1]]
    """
    return _nm_pattern(
        {name: magnitude_score(w) for name, w in weights.items()}, n, m, n if keep is None else keep, previous
    )


def _nm_pattern(
    scores: Mapping[str, Tensor], n: int, m: int, k: int, previous: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """The N:M pattern on scores: keep the ``k`` best of every ``m`` along the input (see :func:`nm_masks`)."""
    prev = previous or {}
    masks = {}
    for name, s in scores.items():
        rows = _reduction_last(rank_pruned_last(s, prev.get(name)).view(s.shape))
        width = rows.shape[1]
        pad = (-width) % m
        if pad:
            rows = torch.cat([rows, rows.new_full((rows.shape[0], pad), -math.inf)], dim=1)
        groups = rows.view(rows.shape[0], -1, m)
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        kept = torch.zeros_like(groups, dtype=torch.bool)
        kept.scatter_(-1, order[..., :k], True)
        kept &= groups > -math.inf  # padding is never kept
        flat = kept.view(rows.shape[0], -1)[:, :width]
        mask = _from_reduction_last(flat, s.shape).contiguous()
        if name in prev:  # an entry pruned before stays pruned even where its group keeps spare room
            mask &= prev[name].to(mask.device)
        masks[name] = mask
    return masks


def _nm_family(method: str) -> MaskPattern | None:
    """The N:M pattern ``method`` names (``"2:4"``: keep 2 of every 4), ``None`` for a method of another family."""
    nm = parse_nm(method)
    if nm is None:
        return None
    n, m = nm

    def pattern(
        scores: Mapping[str, Tensor], sparsity: float, scope: str, previous: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        return _nm_pattern(scores, n, m, nm_keep_per_group(sparsity, n, m), previous)

    return pattern
