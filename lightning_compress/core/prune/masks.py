"""Which weights to zero: magnitude and channel masks, the N:M ones re-exported, and the one entry point.

A *mask* is a ``bool`` tensor shaped like its weight, ``True`` where the weight is kept. Masks
travel as a dict ``parameter name -> mask``. Every function here is deterministic: ties between
equal scores are broken by position (layer order, then the flat index), so two processes with
the same weights compute the same masks.

A *mask pattern* decides which entries to zero from the weights' *scores*
(:mod:`~lightning_compress.core.prune.scores`): ``"magnitude"`` zeroes the lowest-scored entries
anywhere, ``"channel"`` whole output channels, ``"N:M"`` all but N of every M along the input
(:mod:`~lightning_compress.core.prune.nm`; :func:`nm_masks`, :func:`nm_keep_per_group` and
:func:`parse_nm` are re-exported here). :func:`compute_masks` looks the ``method`` up in one table,
where this module registers the three; a new pattern is one entry
(:mod:`~lightning_compress.core.prune.patterns`: ``register_pattern``, or ``register_pattern_family`` for a
parametrised one such as N:M). Applying masks in place lives with the mask keeper
(:func:`~lightning_compress.core.prune.keeper.apply_masks_`, re-exported here).

Masks are *monotone* when a ``previous`` mask is given: a weight pruned before stays pruned, which
is what gradual pruning (Zhu & Gupta 2017) does, since a pruned weight is exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from lightning_compress.core.layout import LayoutPlan, WeightLayout
from lightning_compress.core.prune.keeper import apply_masks_, mask_optimizer_state_  # noqa: F401  (their old home)
from lightning_compress.core.prune.nm import _nm_family
from lightning_compress.core.prune.nm import nm_keep_per_group as nm_keep_per_group  # their old home
from lightning_compress.core.prune.nm import nm_masks as nm_masks
from lightning_compress.core.prune.nm import parse_nm as parse_nm
from lightning_compress.core.prune.patterns import (
    MaskPattern,
    pattern_for,
    pattern_names,
    prune_count,
    rank_pruned_last,
    register_pattern,
    register_pattern_family,
    smallest,
)
from lightning_compress.core.prune.scores import ScoreFn, magnitude_score, score_weights

__all__ = [
    "METHODS",
    "SCOPES",
    "channel_masks",
    "compute_masks",
    "magnitude_masks",
    "masks_sparsity",
]

SCOPES: tuple[str, ...] = ("global", "layer", "row")
"""``global``: one ranking over all selected weights; ``layer``: each layer to the target; ``row``: each
output row (output channel) of each layer to the target, the comparison group of Wanda (Sun et al. 2023)."""


def _magnitudes(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: magnitude_score(w) for name, w in weights.items()}


@torch.no_grad()
def magnitude_masks(
    weights: Mapping[str, Tensor], sparsity: float, scope: str = "global", previous: Mapping[str, Tensor] | None = None
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
    return _unstructured_pattern(_magnitudes(weights), sparsity, scope, previous)


def _scoped(
    one_layer: Callable[[Tensor, float, Tensor | None], Tensor],
    all_layers: Callable[[Mapping[str, Tensor], float, Mapping[str, Tensor]], dict[str, Tensor]],
) -> MaskPattern:
    """A pattern from its two scopes: ``"layer"`` decides each layer alone, ``"global"`` ranks all together."""

    def pattern(
        scores: Mapping[str, Tensor], sparsity: float, scope: str, previous: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        prev = previous or {}
        if scope == "row":
            if one_layer is not _unstructured_layer:
                raise ValueError("scope 'row' applies to unstructured and N:M masks only (a row is a whole channel)")
            return {name: _unstructured_rows(s, sparsity, prev.get(name)) for name, s in scores.items()}
        if scope == "layer":
            return {name: one_layer(s, sparsity, prev.get(name)) for name, s in scores.items()}
        return all_layers(scores, sparsity, prev) if scores else {}

    return pattern


def _unstructured_layer(score: Tensor, sparsity: float, previous: Tensor | None) -> Tensor:
    """The ``"magnitude"`` pattern on one layer: zero its lowest-scored entries."""
    return ~smallest(rank_pruned_last(score, previous), prune_count(sparsity, score.numel())).view(score.shape)


def _unstructured_rows(score: Tensor, sparsity: float, previous: Tensor | None) -> Tensor:
    """The ``"magnitude"`` pattern with ``scope="row"``: each output row (dim 0) loses its lowest-scored entries.

    Every row prunes ``round(sparsity * row_length)``; ties go to the lower index in the row.
    """
    rows = rank_pruned_last(score, previous).view(score.shape[0], -1)
    k = prune_count(sparsity, rows.shape[1])
    pruned = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        order = torch.sort(rows, dim=1, stable=True).indices  # ascending; equal scores keep their order
        pruned.scatter_(1, order[:, :k], True)
    return (~pruned).view(score.shape)


def _unstructured_global(
    scores: Mapping[str, Tensor], sparsity: float, prev: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The ``"magnitude"`` pattern over all layers: one ranking, one threshold."""
    devices = {s.device for s in scores.values()}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    flat = torch.cat([rank_pruned_last(s, prev.get(name)).to(device) for name, s in scores.items()])
    pruned = smallest(flat, prune_count(sparsity, flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = (~pruned[offset : offset + s.numel()]).view(s.shape).to(s.device)
        offset += s.numel()
    return masks


_unstructured_pattern = _scoped(_unstructured_layer, _unstructured_global)


def _channel_scores(score: Tensor, previous: Tensor | None) -> Tensor:
    """RMS of each output channel's scores (dim 0), with previously pruned channels ranked below everything.

    For the magnitude score this is the RMS of the channel's weights, ``||w_c||_2 / sqrt(numel(w_c))``.
    """
    rows = score.reshape(score.shape[0], -1)
    channel = rows.norm(dim=1) / math.sqrt(rows.shape[1])
    if previous is not None:
        alive = previous.to(channel.device).reshape(score.shape[0], -1).any(dim=1)
        channel = channel.masked_fill(~alive, -math.inf)
    return channel


def _expand_channels(keep: Tensor, weight: Tensor) -> Tensor:
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
    return keep.view(shape).expand(weight.shape).to(weight.device).clone()


@torch.no_grad()
def channel_masks(
    weights: Mapping[str, Tensor], sparsity: float, scope: str = "global", previous: Mapping[str, Tensor] | None = None
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
    return _channel_pattern(_magnitudes(weights), sparsity, scope, previous)


def _channel_layer(score: Tensor, sparsity: float, previous: Tensor | None) -> Tensor:
    """The ``"channel"`` pattern on one layer: its channels of least RMS score, one always kept."""
    return _expand_channels(layer_channel_keep(_channel_scores(score, previous), sparsity), score)


def layer_channel_keep(channel: Tensor, sparsity: float) -> Tensor:
    """Which channels of one layer the ``"layer"``-scoped ``"channel"`` pattern keeps, from their scores alone.

    ``channel`` holds one score per output channel (see :func:`global_channel_keep`); the
    ``round(sparsity * C)`` lowest go, at most ``C - 1``. Sharded training calls it with the scores
    gathered from every shard.
    """
    k = min(prune_count(sparsity, channel.numel()), channel.numel() - 1)
    return ~smallest(channel, k)


def _channel_global(scores: Mapping[str, Tensor], sparsity: float, prev: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``"channel"`` pattern over all layers (see :func:`channel_masks`)."""
    channels = [_channel_scores(s, prev.get(name)).cpu() for name, s in scores.items()]
    keeps = global_channel_keep(channels, [s[0].numel() for s in scores.values()], sparsity)
    return {name: _expand_channels(keep, s) for (name, s), keep in zip(scores.items(), keeps, strict=True)}


def global_channel_keep(channels: list[Tensor], row_numels: list[int], sparsity: float) -> list[Tensor]:
    """Which channels of each layer the global ``"channel"`` pattern keeps, from the channels' scores alone.

    Args:
        channels: one 1-D score per layer (the RMS of each output channel, ``-inf`` where pruned before).
        row_numels: weights per channel of each layer.
        sparsity: fraction of all the layers' weights to prune.

    Returns:
        One bool vector per layer (``True`` = kept). Sharded training calls it with the channel scores
        gathered from every shard (:mod:`lightning_compress.core.sharding`), so it decides exactly as
        an unsharded run.
    """
    # Candidates are every channel except the best one of each layer, which is never pruned.
    ranked, sizes, protected = [], [], []
    for channel, row in zip(channels, row_numels, strict=True):
        protect = torch.zeros(channel.numel(), dtype=torch.bool)
        protect[int(torch.argmax(channel))] = True
        ranked.append(channel)
        protected.append(protect)
        sizes.append(torch.full((channel.numel(),), row, dtype=torch.int64))
    score_all, size_all, protect_all = torch.cat(ranked), torch.cat(sizes), torch.cat(protected)
    total = sum(c.numel() * row for c, row in zip(channels, row_numels, strict=True))
    wanted = prune_count(sparsity, total)
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
    keeps, offset = [], 0
    for channel in channels:
        keeps.append(~pruned[offset : offset + channel.numel()])
        offset += channel.numel()
    return keeps


_channel_pattern = _scoped(_channel_layer, _channel_global)


def compute_masks(
    weights: Mapping[str, Tensor],
    sparsity: float,
    method: str = "magnitude",
    scope: str = "global",
    previous: Mapping[str, Tensor] | None = None,
    *,
    score: str | ScoreFn = "magnitude",
    statistics: Mapping[str, Tensor] | None = None,
    layouts: Mapping[str, WeightLayout | None] | None = None,
) -> dict[str, Tensor]:
    """Masks for ``method`` at ``sparsity``: the one entry point the callbacks use.

    The weights are scored (:func:`~lightning_compress.core.prune.scores.score_weights`) and the
    pattern registered for ``method`` decides from the scores. A weight with a non-standard
    ``layout`` is first viewed as ``(out, in, ...)`` projections (:class:`~lightning_compress.core.layout.LayoutPlan`):
    a Hugging Face ``Conv1D``'s ``[in, out]`` weight transposed, a ``MultiheadAttention``
    ``in_proj_weight`` split into its query, key and value blocks, each pruned as a layer of its own;
    the masks come back in the stored layout.

    Args:
        weights: ``name -> weight``.
        sparsity: fraction to prune now. For an N:M method it sets the staircase step
            (:func:`nm_keep_per_group`); at ``1 - N/M`` the masks are exactly N:M.
        method: ``"magnitude"``, ``"channel"``, an N:M pattern such as ``"2:4"``, or a registered one.
        scope: ``"global"``, ``"layer"`` or ``"row"`` (each output row of each projection to the
            target; unstructured only); ignored by N:M, whose groups are within rows already.
        previous: masks from the last update, kept pruned.
        score: a registered score name or a score function (default ``|w|``).
        statistics: ``name -> statistic`` the score needs (e.g. input norms for ``"wanda"``).
        layouts: ``name -> layout`` (:attr:`~lightning_compress.core.selection.Target.layout`); missing
            names are standard ``(out, in, ...)`` weights.

    Returns:
        ``name -> bool mask`` (``True`` = kept).

    Raises:
        ValueError: for an unknown ``method``.

    Example:
        >>> import torch
        >>> w = {"fc": torch.arange(1.0, 9.0).view(2, 4)}
        >>> compute_masks(w, 0.5, method="2:4")["fc"].int().tolist()
        [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    pattern = pattern_for(method)
    plan = LayoutPlan(weights, layouts)
    with torch.no_grad():
        stats = plan.repeat(statistics) if statistics is not None else None
        scores = score_weights(plan.split(weights), score, stats)
        return plan.join(pattern(scores, sparsity, scope, plan.split(previous) if previous is not None else None))


register_pattern("magnitude", _unstructured_pattern)
register_pattern("channel", _channel_pattern)
register_pattern_family("N:M", _nm_family, example="2:4")

METHODS: tuple[str, ...] = pattern_names()
"""The built-in pruning methods; ``"N:M"`` stands for any pattern such as ``"2:4"``
(:func:`pattern_names` lists user-registered ones too)."""


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
