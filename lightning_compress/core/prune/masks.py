"""Which weights to zero: magnitude, channel and N:M masks, and applying them in place.

A *mask* is a ``bool`` tensor shaped like its weight, ``True`` where the weight is kept. Masks
travel as a dict ``parameter name -> mask``. Every function here is deterministic: ties between
equal scores are broken by position (layer order, then the flat index), so two processes with
the same weights compute the same masks.

Masks are *monotone* when a ``previous`` mask is given: a weight pruned before stays pruned, which
is what gradual pruning (Zhu & Gupta 2017) does, since a pruned weight is exactly zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

try:  # numpy ships with every torch wheel; fall back to torch.kthvalue if it is missing
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = [
    "METHODS",
    "SCOPES",
    "apply_masks_",
    "channel_masks",
    "compute_masks",
    "magnitude_masks",
    "mask_optimizer_state_",
    "masks_sparsity",
    "nm_keep_per_group",
    "nm_masks",
    "parse_nm",
]

METHODS: tuple[str, ...] = ("magnitude", "channel", "N:M")
"""Pruning methods; ``"N:M"`` stands for any pattern such as ``"2:4"``."""

SCOPES: tuple[str, ...] = ("global", "layer")
"""``global``: one ranking over all selected weights; ``layer``: each layer to the target."""

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


def _count(sparsity: float, total: int) -> int:
    """Number of entries to prune out of ``total`` (round half up, exact for representable fractions)."""
    return min(max(math.floor(sparsity * total + 0.5), 0), total)


def _kth_smallest(scores: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D float tensor, as a 0-d tensor on its device."""
    if scores.device.type == "cpu" and _np is not None:
        # numpy's introselect is about ten times faster than torch.kthvalue on the CPU
        value = _np.partition(scores.numpy(), k - 1)[k - 1]
        return torch.tensor(float(value), dtype=scores.dtype)
    return torch.kthvalue(scores, k).values


def _smallest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` smallest entries of a 1-D tensor; ties go to the lower index."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    threshold = _kth_smallest(scores, k)
    chosen = scores < threshold
    missing = k - int(chosen.sum())
    equal = scores == threshold
    if int(equal.sum()) == missing:  # no tie to break (the usual case with real weights)
        return chosen.logical_or_(equal)
    ties = torch.nonzero(equal).flatten()
    chosen[ties[:missing]] = True  # the first `missing` of the tied entries, by position
    return chosen


def _scores(weight: Tensor, previous: Tensor | None) -> Tensor:
    """``|w|`` in float32, flattened, with previously pruned entries ranked below everything."""
    score = weight.detach().abs().float().flatten()
    if previous is not None:
        score = score.masked_fill(~previous.to(score.device).flatten(), -1.0)
    return score


@torch.no_grad()
def magnitude_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep the largest ``|w|``: zero the ``round(sparsity * n)`` smallest.

    Args:
        weights: ``name -> weight``; the masks come back under the same names, on the same devices.
        sparsity: fraction to prune, in ``[0, 1]``.
        scope: ``"global"`` ranks all weights together (one threshold, so layers end at different
            sparsities: the ones with many small weights lose more); ``"layer"`` prunes each layer
            to ``sparsity`` on its own.
        previous: masks from the last update; entries they prune stay pruned.

    Returns:
        ``name -> bool mask`` (``True`` = kept).

    Example:
        >>> import torch
        >>> w = {"a": torch.tensor([[0.1, -2.0], [0.3, 4.0]]), "b": torch.tensor([[-0.2, 0.05]])}
        >>> m = magnitude_masks(w, 0.5)
        >>> m["a"].tolist(), m["b"].tolist()
        ([[False, True], [True, True]], [[False, False]])
    """
    prev = previous or {}
    if scope == "layer":
        return {
            name: ~_smallest(_scores(w, prev.get(name)), _count(sparsity, w.numel())).view(w.shape)
            for name, w in weights.items()
        }
    if not weights:
        return {}
    devices = {w.device for w in weights.values()}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    flat = torch.cat([_scores(w, prev.get(name)).to(device) for name, w in weights.items()])
    pruned = _smallest(flat, _count(sparsity, flat.numel()))
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = (~pruned[offset : offset + w.numel()]).view(w.shape).to(w.device)
        offset += w.numel()
    return masks


def _channel_scores(weight: Tensor, previous: Tensor | None) -> Tensor:
    """RMS of each output channel (dim 0), with previously pruned channels ranked below everything."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    score = rows.norm(dim=1) / math.sqrt(rows.shape[1])
    if previous is not None:
        alive = previous.to(score.device).reshape(weight.shape[0], -1).any(dim=1)
        score = score.masked_fill(~alive, -1.0)
    return score


def _expand_channels(keep: Tensor, weight: Tensor) -> Tensor:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return keep.view(shape).expand(weight.shape).to(weight.device).clone()


@torch.no_grad()
def channel_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    scope: str = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Zero whole output channels (rows of a Linear weight, filters of a convolution) of least L2 norm.

    The channel axis is dim 0 for ``Linear`` and every ``ConvNd``, grouped and depthwise ones
    included (their weight is ``(out, in / groups, *kernel)``). A layer always keeps at least one
    channel, so no layer is cut off entirely.

    Args:
        weights: ``name -> weight`` with at least one dimension.
        sparsity: fraction of the weights to prune, in ``[0, 1)``.
        scope: ``"layer"`` prunes ``round(sparsity * C)`` of each layer's ``C`` channels (at most
            ``C - 1``). ``"global"`` ranks every channel of every layer by its RMS
            (``||w_c||_2 / sqrt(numel(w_c))``, so layers of different fan-in compare fairly) and prunes
            the lowest-ranked channels until the pruned weights are as close as the channel sizes
            allow to ``sparsity`` of all selected weights.
        previous: masks from the last update; channels they prune stay pruned.

    Returns:
        ``name -> bool mask`` (``True`` = kept), constant along every dimension but the first.

    Example:
        >>> import torch
        >>> w = {"fc": torch.tensor([[1.0, 1.0], [0.1, 0.1], [3.0, 0.0], [0.0, 0.2]])}
        >>> channel_masks(w, 0.5)["fc"][:, 0].tolist()
        [True, False, True, False]
    """
    prev = previous or {}
    if scope == "layer":
        masks = {}
        for name, w in weights.items():
            channels = w.shape[0]
            k = min(_count(sparsity, channels), channels - 1)
            keep = ~_smallest(_channel_scores(w, prev.get(name)), k)
            masks[name] = _expand_channels(keep, w)
        return masks
    if not weights:
        return {}
    # Candidates are every channel except the best one of each layer, which is never pruned.
    scores, sizes, owners, protected = [], [], [], []
    for i, (name, w) in enumerate(weights.items()):
        score = _channel_scores(w, prev.get(name)).cpu()
        protect = torch.zeros(score.numel(), dtype=torch.bool)
        protect[int(torch.argmax(score))] = True
        scores.append(score)
        protected.append(protect)
        sizes.append(torch.full((score.numel(),), w[0].numel(), dtype=torch.int64))
        owners.append(torch.full((score.numel(),), i, dtype=torch.int64))
    score_all, size_all, protect_all = torch.cat(scores), torch.cat(sizes), torch.cat(protected)
    total = sum(w.numel() for w in weights.values())
    wanted = _count(sparsity, total)
    candidates = torch.nonzero(~protect_all).flatten()
    order = candidates[torch.sort(score_all[candidates], stable=True).indices]
    cumulative = torch.cumsum(size_all[order], 0)
    # The longest prefix that stays at or under the wanted count, plus one more channel if that
    # lands closer to it.
    n = int(torch.searchsorted(cumulative, torch.tensor(wanted), right=True))
    below = int(cumulative[n - 1]) if n > 0 else 0
    if n < order.numel() and int(cumulative[n]) - wanted < wanted - below:
        n += 1
    pruned = torch.zeros(score_all.numel(), dtype=torch.bool)
    pruned[order[:n]] = True
    masks, offset = {}, 0
    for name, w in weights.items():
        channels = w.shape[0]
        masks[name] = _expand_channels(~pruned[offset : offset + channels], w)
        offset += channels
    return masks


def nm_keep_per_group(sparsity: float, n: int, m: int) -> int:
    """Weights kept per group of ``m`` at ``sparsity`` on the way to N:M: ``m - round(sparsity * m)``, at least ``n``.

    A gradual schedule thus climbs a staircase (4:4, 3:4, 2:4 for ``"2:4"``) and ends exactly on N:M.

    Example:
        >>> [nm_keep_per_group(s, 2, 4) for s in (0.0, 0.1, 0.2, 0.4, 0.5)]
        [4, 4, 3, 2, 2]
    """
    return max(n, m - _count(sparsity, m))


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
    k = n if keep is None else keep
    prev = previous or {}
    masks = {}
    for name, w in weights.items():
        score = _scores(w, prev.get(name)).view(w.shape)
        rows = _reduction_last(score)
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
        mask = _from_reduction_last(flat, w.shape).contiguous()
        if name in prev:  # an entry pruned before stays pruned even where its group keeps spare room
            mask &= prev[name].to(mask.device)
        masks[name] = mask
    return masks


def compute_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    method: str = "magnitude",
    scope: str = "global",
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks for ``method`` at ``sparsity``: the one entry point the callbacks use.

    Args:
        weights: ``name -> weight``.
        sparsity: fraction to prune now. For an N:M method it sets the staircase step
            (:func:`nm_keep_per_group`); at ``1 - N/M`` the masks are exactly N:M.
        method: ``"magnitude"``, ``"channel"`` or an N:M pattern such as ``"2:4"``.
        scope: ``"global"`` or ``"layer"`` (ignored by N:M).
        previous: masks from the last update, kept pruned.

    Returns:
        ``name -> bool mask`` (``True`` = kept).

    Example:
        >>> import torch
        >>> w = {"fc": torch.arange(1.0, 9.0).view(2, 4)}
        >>> compute_masks(w, 0.5, method="2:4")["fc"].int().tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    if method == "magnitude":
        return magnitude_masks(weights, sparsity, scope, previous)
    if method == "channel":
        return channel_masks(weights, sparsity, scope, previous)
    nm = parse_nm(method)
    if nm is None:
        raise ValueError(f"unknown pruning method {method!r}")
    n, m = nm
    return nm_masks(weights, n, m, keep=nm_keep_per_group(sparsity, n, m), previous=previous)


def masks_sparsity(masks: Iterable[Tensor]) -> float:
    """Fraction of entries the masks prune.

    Example:
        >>> import torch
        >>> masks_sparsity([torch.tensor([True, False]), torch.tensor([False, False])])
        0.75
    """
    total = pruned = 0
    for mask in masks:
        total += mask.numel()
        pruned += mask.numel() - int(torch.count_nonzero(mask))
    return pruned / total if total else 0.0


@torch.no_grad()
def apply_masks_(tensors: Sequence[Tensor], multipliers: Sequence[Tensor]) -> None:
    """Multiply each tensor in place by its 0/1 multiplier: one fused kernel for the whole list.

    ``multipliers`` are the masks converted to the tensors' dtype and device (a ``bool`` multiplier
    would take a slow path). Pruned entries become exactly zero.

    Example:
        >>> import torch
        >>> w = [torch.tensor([1.5, -2.0])]
        >>> apply_masks_(w, [torch.tensor([0.0, 1.0])])
        >>> w[0].abs().tolist()
        [0.0, 2.0]
    """
    if tensors:
        torch._foreach_mul_(list(tensors), list(multipliers))


@torch.no_grad()
def mask_optimizer_state_(optimizer: torch.optim.Optimizer, multipliers: Mapping[Tensor, Tensor]) -> int:
    """Zero the optimizer state (momentum, Adam moments, ...) of pruned entries.

    Every state tensor of a masked parameter with the parameter's shape (``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``sum``, ...) is multiplied by the mask, so the
    state cannot move a pruned weight later. Scalars such as ``step`` and factored states of another
    shape are left alone.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        multipliers: ``parameter -> 0/1 multiplier`` of the parameter's shape.

    Returns:
        How many state tensors were masked.
    """
    masked = 0
    for param, state in optimizer.state.items():
        multiplier = multipliers.get(param)
        if multiplier is None:
            continue
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == param.shape and value.is_floating_point():
                value.mul_(multiplier.to(value.dtype))
                masked += 1
    return masked
