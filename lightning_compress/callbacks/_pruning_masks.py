"""When ``PruningCallback`` updates its masks, and where they are decided.

:func:`update_due` says whether the schedule asks for an update at a step; :func:`decide_masks`
returns the masks, the same on every process: one process computes them from the full weights and
broadcasts them (single device, DDP), or, for FSDP2 ``DTensor`` weights, every rank decides on its
own rows collectively (:func:`~lightning_compress.core.sharding.sharded_masks`).
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from torch import Tensor

from lightning_compress.callbacks._channel_removal import ChannelRemoval
from lightning_compress.callbacks._pruning_checks import check_finite
from lightning_compress.core.layout import WeightLayout
from lightning_compress.core.prune.masks import compute_masks
from lightning_compress.core.prune.schedules import PruningWindow
from lightning_compress.core.sharding import has_dtensors, sharded_masks

__all__ = ["decide_masks", "update_due"]


def update_due(
    window: PruningWindow, step: int, after_step: bool, last_update: int | None, applied: float | None
) -> bool:
    """Whether the masks are updated at global step ``step`` (``after_step``: at the end of its batch).

    An update at step ``t`` runs between optimizer steps ``t`` and ``t + 1``: right after step ``t``
    (end of the batch), so the target is in place for the validation and checkpoints at the end of
    ``end_epoch``, except at the start of the window, which runs before the first batch of
    ``start_epoch`` so that nothing is pruned before it. ``last_update``: the step of the last
    update (none twice at one step); ``applied``: the sparsity of the current masks (``None``: none yet).
    """
    if step == last_update or (after_step and step <= window.start):
        return False
    # A run resumed past the start of the window without pruning state prunes at once.
    return window.is_update(step) or (window.started(step) and applied is None)


def decide_masks(
    trainer: pl.Trainer,
    params: Mapping[str, Tensor],
    target: float,
    method: str,
    scope: str,
    *,
    previous: dict[str, Tensor] | None,
    layouts: Mapping[str, WeightLayout],
    score: str,
    statistics: dict[str, Tensor] | None,
    channels: ChannelRemoval | None,
) -> dict[str, Tensor]:
    """The masks of ``params`` at ``target`` sparsity, identical on every rank.

    ``statistics`` are the input norms of an activation-aware score, already summed over the ranks;
    ``channels``, when ready, computes group-coupled masks for ``remove_channels=True``.

    Raises:
        FloatingPointError: when a weight holds NaN or infinity (checked on every rank).
    """
    sharded = has_dtensors(params.values())  # FSDP2: every rank decides on its rows, collectively
    check_finite(params, trainer.global_step)  # on every rank: they hold the same weights
    masks: dict[str, Tensor] | None = None
    if sharded:
        _, masks = sharded_masks(params, target, method, scope, previous, layouts, score=score, statistics=statistics)
    elif trainer.is_global_zero or trainer.world_size == 1:
        weights = {name: p.detach() for name, p in params.items()}
        if channels is not None and channels.ready:
            masks = channels.compute(weights, target, scope, previous)
        else:
            masks = compute_masks(
                weights,
                target,
                method,
                scope,
                previous=previous,
                score=score,
                statistics=statistics,
                layouts=layouts,
            )
    if trainer.world_size > 1 and not sharded:
        # Rank 0 decides; every rank installs exactly the same masks.
        cpu = {k: v.cpu() for k, v in masks.items()} if masks is not None else None
        masks = trainer.strategy.broadcast(cpu, src=0)
    assert masks is not None  # computed above, or received from rank zero
    return masks
