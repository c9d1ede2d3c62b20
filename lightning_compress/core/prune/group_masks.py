"""Group-coupled channel masks: a unit (channel or head) of a coupled group is pruned whole.

A unit's score is the sum of its members' channel scores (each the RMS of the weight slice, as in
:func:`~lightning_compress.core.prune.masks.channel_masks`), so the convolutions feeding one
residual add decide together. Pruning a unit zeroes its producer rows in the selected weights and,
in :func:`extra_masks`, the bias entries and the affine entries of the norm layer that follows it,
so the channel is exactly zero downstream and :func:`~lightning_compress.remove_channels` can take
it out. Units are ranked deterministically (stable sort by score, then position).

Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_compress.core.prune.groups import ChannelGroup, Cut, Unit
from lightning_compress.core.prune.masks import channel_masks

__all__ = ["eligible_groups", "extra_masks", "group_channel_masks"]


def _count(fraction: float, total: int) -> int:
    """``round(fraction * total)`` (half up), within ``[0, total]``."""
    return min(max(math.floor(fraction * total + 0.5), 0), total)


def eligible_groups(groups: Iterable[ChannelGroup], weights: Mapping[str, Tensor]) -> list[ChannelGroup]:
    """The removable groups whose every scored slice lies in a selected weight (and with two units or more)."""
    out = []
    for g in groups:
        if not g.removable or len(g.units) < 2:
            continue
        if all(c.param in weights for u in g.units for c in u.score_cuts):
            out.append(g)
    return out


def _unit_score(unit: Unit, weights: Mapping[str, Tensor], previous: Mapping[str, Tensor] | None) -> float:
    total = 0.0
    alive = False
    for cut in unit.score_cuts:
        w = weights[cut.param].detach()
        idx = torch.tensor(cut.indices, device=w.device)
        rows = w.index_select(cut.axis, idx).float()
        total += float(rows.norm()) / math.sqrt(max(rows.numel(), 1))
        if previous is None or cut.param not in previous:
            alive = True
        else:
            alive = alive or bool(previous[cut.param].index_select(cut.axis, idx.cpu()).any())
    return total if alive else -1.0


def _unit_size(unit: Unit, weights: Mapping[str, Tensor]) -> int:
    size = 0
    for cut in unit.score_cuts:
        w = weights[cut.param]
        size += len(cut.indices) * (w.numel() // max(w.shape[cut.axis], 1))
    return size


@torch.no_grad()
def group_channel_masks(
    weights: Mapping[str, Tensor],
    groups: Sequence[ChannelGroup],
    sparsity: float,
    scope: str = "global",
    previous: Mapping[str, Tensor] | None = None,
    fallback: Iterable[str] = (),
) -> tuple[dict[str, Tensor], list[Unit]]:
    """Masks that prune whole units of ``groups``; weights in no group are left dense.

    Args:
        weights: ``parameter name -> weight`` of the selected layers.
        groups: the coupled groups (only :func:`eligible_groups` of them are pruned).
        sparsity: in ``"layer"`` scope, the fraction of each group's units to prune (at most all but
            one); in ``"global"`` scope, the fraction of the grouped weights to zero, taking units in
            order of increasing score (each group keeps at least one unit).
        scope: ``"global"`` or ``"layer"``.
        previous: masks from the last update; units they pruned stay pruned.
        fallback: parameter names outside every traced graph: they get per-layer channel masks
            (as :func:`~lightning_compress.core.prune.masks.channel_masks` with ``scope="layer"``).

    Returns:
        ``(masks, pruned units)``: a bool mask (``True`` = kept) for every name in ``weights``, and
        the units pruned (for :func:`extra_masks`).
    """
    prev = previous or {}
    chosen = eligible_groups(groups, weights)
    scored: list[tuple[float, int, int, Unit]] = []  # score, group index, unit index, unit
    for gi, g in enumerate(chosen):
        for ui, u in enumerate(g.units):
            scored.append((_unit_score(u, weights, prev or None), gi, ui, u))
    pruned: list[Unit] = []
    if scope == "layer":
        for gi in range(len(chosen)):
            mine = sorted((s for s in scored if s[1] == gi), key=lambda s: (s[0], s[2]))
            k = min(_count(sparsity, len(mine)), len(mine) - 1)
            pruned += [s[3] for s in mine[:k]]
    else:
        total = sum(_unit_size(s[3], weights) for s in scored)
        wanted = _count(sparsity, total)
        left = {gi: len(g.units) for gi, g in enumerate(chosen)}
        done = 0
        # across groups the sum is divided by the number of members, so a residual group of five
        # convolutions is not kept for having five of them
        ranked = sorted(scored, key=lambda s: (s[0] / max(len(s[3].score_cuts), 1), s[1], s[2]))
        for score, gi, _ui, unit in ranked:
            size = _unit_size(unit, weights)
            if left[gi] <= 1:
                continue
            # a unit pruned before stays pruned; otherwise take units while that brings us closer to the target
            if score >= 0 and (done >= wanted or done + size - wanted > wanted - done):
                continue
            pruned.append(unit)
            left[gi] -= 1
            done += size
    masks = {name: torch.ones(w.shape, dtype=torch.bool, device=w.device) for name, w in weights.items()}
    for unit in pruned:
        for cut in unit.score_cuts:
            _zero(masks[cut.param], cut)
    rest = {n: weights[n] for n in fallback if n in weights}
    if rest:
        masks.update(channel_masks(rest, sparsity, "layer", {n: prev[n] for n in rest if n in prev} or None))
    return masks, pruned


def _zero(mask: Tensor, cut: Cut) -> None:
    idx = torch.tensor(cut.indices, device=mask.device)
    mask.index_fill_(cut.axis, idx, False)


def extra_targets(groups: Iterable[ChannelGroup], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The bias and norm-affine parameters that pruning units of ``groups`` zeroes (``name -> tensor``)."""
    out: dict[str, Tensor] = {}
    for g in groups:
        for u in g.units:
            for cut in _extra_cuts(u):
                if cut.param in params:
                    out[cut.param] = params[cut.param]
    return out


def _extra_cuts(unit: Unit) -> list[Cut]:
    scored = set(unit.score_cuts)
    return [c for c in unit.cuts if c.axis == 0 and c not in scored and c.tensor in ("bias", "weight", "in_proj_bias")]


def extra_masks(targets: Mapping[str, Tensor], pruned: Iterable[Unit]) -> dict[str, Tensor]:
    """Masks over ``targets`` (from :func:`extra_targets`) that zero the entries of the ``pruned`` units."""
    masks = {name: torch.ones(t.shape, dtype=torch.bool, device=t.device) for name, t in targets.items()}
    for unit in pruned:
        for cut in _extra_cuts(unit):
            if cut.param in masks:
                _zero(masks[cut.param], cut)
    return masks
