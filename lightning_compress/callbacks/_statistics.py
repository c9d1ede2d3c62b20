"""When ``PruningCallback`` gathers the input statistics of an activation-aware score (``score="wanda"``).

The collector (:class:`~lightning_compress.core.prune.statistics.InputNormCollector`) holds forward
pre-hooks only during the training batches that precede a mask update that will change the masks:
for an update at optimizer step ``u``, the batches run at global steps ``u - score_batches`` to
``u - 1`` (with gradient accumulation, every micro-batch of those steps). The hooks are put on in
``on_train_batch_start`` and taken off in ``on_train_batch_end`` of each such batch, so validation,
other batches and the steps after the window never see them. An update that finds no statistics
(the first update at step 0: ``schedule="constant"`` or any schedule at ``start_epoch=0``; or a run
resumed past the start without pruning state) first runs the LightningModule's ``forward`` without
gradients, in eval mode, over the first ``score_batches`` batches of the train loader (each fed by
the rule of :mod:`lightning_compress.core.batches`; a LightningModule without its own ``forward`` runs
its ``training_step`` instead, under ``no_grad``: what it logs is logged once more for step 0), with
the random state restored afterwards.
Under DDP the sums are all-reduced (summed) across ranks before rank zero scores the weights.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_compress.core.batches import batch_to, call_model, first_loader
from lightning_compress.core.prune.schedules import PruningWindow
from lightning_compress.core.prune.scores import score_named
from lightning_compress.core.prune.statistics import InputNormCollector, flat_sums, split_sums
from lightning_compress.core.selection import Target

__all__ = ["ScoreStatistics", "next_update"]


def next_update(window: PruningWindow, step: int) -> int | None:
    """The first mask-update step after ``step`` (``None`` when the window is over).

    Example:
        >>> w = PruningWindow(start=10, end=20, update_every=4)
        >>> [next_update(w, s) for s in (0, 10, 13, 14, 18, 20)]
        [10, 14, 14, 18, 20, None]
    """
    if step < window.start:
        return window.start
    if step >= window.end:
        return None
    return min(window.start + ((step - window.start) // window.update_every + 1) * window.update_every, window.end)


class ScoreStatistics:
    """The statistics side of one ``PruningCallback``: hooks on the right batches, calibration, all-reduce."""

    def __init__(self, targets: list[Target], batches: int) -> None:
        self.collector = InputNormCollector(targets)
        self.batches = batches
        self._warned: set[str] = set()

    @classmethod
    def for_score(
        cls, score: str, targets: list[Target], batches: int, saved: dict[str, Any] | None
    ) -> ScoreStatistics | None:
        """The statistics side for ``score`` (``None`` for a score that needs none), with the ``saved`` sums."""
        if score_named(score).statistic is None:
            return None
        statistics = cls(targets, batches)
        statistics.collector.load_state(saved)
        return statistics

    def before_batch(self, window: PruningWindow | None, step: int, changes: Any) -> None:
        """Put the hooks on for the batch at ``step`` if it is wanted (:meth:`wanted`); off again at its end."""
        if self.wanted(window, step, changes):
            self.collector.install()

    def wanted(self, window: PruningWindow | None, step: int, changes: Any) -> bool:
        """Whether the batch run at global step ``step`` precedes (closely enough) an update that changes masks.

        ``changes(u)`` says whether the update at step ``u`` will change the masks.
        """
        if window is None:
            return False
        upcoming = next_update(window, step)
        return upcoming is not None and upcoming - step <= self.batches and bool(changes(upcoming))

    def close(self) -> None:
        self.collector.remove()

    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A forward pass without gradients over the first ``batches`` train batches, hooks installed."""
        loader = first_loader(trainer.train_dataloader)
        if loader is None:
            return
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        self.collector.install()
        try:
            with torch.random.fork_rng(devices=[]):
                for i, batch in enumerate(itertools.islice(loader, self.batches)):
                    batch = _to_device(pl_module, batch)
                    if _overrides_forward(pl_module):
                        call_model(pl_module, batch)
                    else:  # no forward: the training step is the only way the module is called
                        pl_module.training_step(batch, i)
        finally:
            self.collector.remove()
            for module, mode in modes.items():
                module.training = mode

    def norms(self, trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> dict[str, Tensor]:
        """The input norms of every selected weight, summed over ranks (calibrating first when nothing was seen)."""
        collector = self.collector
        if not collector.seen:
            self.calibrate(trainer, pl_module)
        names = list(collector.targets)
        unseen = set(collector.unseen)
        sums = collector.sums
        if trainer.world_size > 1:
            shapes = {n: collector.shape_of(n) for n in names}
            flat = flat_sums(sums, names, shapes)
            flat = trainer.strategy.reduce(flat, reduce_op="sum")
            sums = {n: t for n, t in split_sums(flat, names, shapes).items() if n not in unseen}
        norms = collector.norms(sums)
        # no input observed: the magnitude alone ranks these layers
        norms.update(collector.norms({name: torch.ones(collector.shape_of(name)) for name in unseen}))
        fresh = sorted(unseen - self._warned)
        if fresh:
            self._warned.update(fresh)
            rank_zero_warn(
                f"{who}: score 'wanda' saw no input for {fresh} (a layer that is not called as a module, such as"
                " nn.MultiheadAttention's out_proj, or one the batches never reach); their weights are ranked by"
                " magnitude alone."
            )
        return norms


def _overrides_forward(pl_module: pl.LightningModule) -> bool:
    return type(pl_module).forward is not pl.LightningModule.forward


def _to_device(pl_module: pl.LightningModule, batch: Any) -> Any:
    try:
        return pl_module._apply_batch_transfer_handler(batch)
    except Exception:  # a module outside a Trainer's loop: move the tensors ourselves
        return batch_to(batch, pl_module.device)
