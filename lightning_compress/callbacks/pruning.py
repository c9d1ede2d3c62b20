"""``PruningCallback``: gradual pruning (Zhu & Gupta 2017) in any Lightning ``Trainer``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_compress._lightning_compat import unwrap_optimizer
from lightning_compress.callbacks._base import CompressionCallback
from lightning_compress.callbacks._channel_removal import ChannelRemoval
from lightning_compress.callbacks._pruning_args import _check_arguments, _check_epochs, _check_options
from lightning_compress.callbacks._pruning_checks import check_no_overlap, may_touch_gradients, summary, warn_cut_off
from lightning_compress.callbacks._pruning_masks import decide_masks, update_due
from lightning_compress.callbacks._pruning_resume import Resumed
from lightning_compress.callbacks._statistics import ScoreStatistics
from lightning_compress.core.layout import WeightLayout
from lightning_compress.core.prune.keeper import MaskKeeper
from lightning_compress.core.prune.schedules import PruningWindow, place_window, sparsity_at
from lightning_compress.core.selection import DEFAULT_PRUNE_TYPES, Target, select_targets
from lightning_compress.errors import check_str_list

__all__ = ["PruningCallback"]

DEFAULT_UPDATE_EVERY_N_STEPS = 10
"""Optimizer steps between two mask updates when ``update_every_n_steps`` is not given."""

DEFAULT_SCORE_BATCHES = 8
"""Optimizer steps (batches) before each update over which ``score="wanda"`` gathers its statistics."""


class PruningCallback(CompressionCallback):
    r"""Prune weights gradually to ``target_sparsity`` while the model trains.

    The sparsity follows a schedule counted in optimizer steps (so ``accumulate_grad_batches`` is
    respected) from the start of ``start_epoch`` to the end of ``end_epoch``; the default ``cubic``
    schedule is Zhu & Gupta (2017), :math:`s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n\Delta t))^3`.
    Every ``update_every_n_steps`` steps, and at the end of the window, the masks are recomputed
    from the current weights; before ``start_epoch`` nothing is pruned.

    Pruned weights are exactly zero after every optimizer step until the end of fit, without forward
    hooks or renamed parameters: the model's ``state_dict`` keys are unchanged and a checkpoint
    loads into a plain model with ``strict=True``. The optimizer state of pruned weights is zeroed
    and their gradients masked, so momentum or Adam moments cannot regrow them.

    Args:
        target_sparsity: fraction of the selected weights to zero, in ``[0, 1)``.
        method: ``"magnitude"`` (smallest ``|w|``), ``"channel"`` (whole output channels by L2 norm,
            grouped and depthwise convolutions included) or an N:M pattern such as ``"2:4"`` (at most
            N nonzeros in every M consecutive weights along the input; ``target_sparsity`` must then
            be ``1 - N/M``, and the schedule climbs a staircase 4:4, 3:4, 2:4).
        scope: ``"global"`` (one threshold over all selected weights), ``"layer"`` (each layer to
            the target) or ``"row"`` (every output row of every layer to the target, the comparison
            group of Wanda; not with ``method="channel"``). N:M patterns hold per group of M within a
            row (the N best of every M by score), so scope does not apply to them.
        schedule: ``"cubic"``, ``"linear"`` or ``"constant"`` (one shot at the start of ``start_epoch``).
        initial_sparsity: sparsity at the start of the window (``<= target_sparsity``).
        start_epoch: first epoch (from 0) of pruning.
        end_epoch: the target is reached at the end of this epoch. ``None``: the window covers half
            of the epochs from ``start_epoch`` to ``max_epochs`` (at least one), leaving the rest to
            fine-tune at full sparsity; in a run bounded by ``max_steps`` instead, half of the
            remaining steps.
        update_every_n_steps: optimizer steps between two mask updates (default 10).
        include: module type names whose ``weight`` is pruned (subclasses count).
        exclude: ``fnmatch`` globs of module names left dense, e.g. ``["classifier.*"]``.
        score: what ranks the weights: ``"magnitude"`` (``|w|``), ``"wanda"`` (``|w_ij| * ||x_j||_2``,
            the magnitude times the L2 norm of the input feature it multiplies, Sun et al. 2023) or any
            name registered with :func:`~lightning_compress.core.prune.scores.register_score`. Wanda's
            norms are gathered with forward pre-hooks during the ``score_batches`` batches before each
            update that changes the masks, and removed after each batch; an update before any training
            batch (the first one at step 0) first runs the model without gradients over the first
            ``score_batches`` train batches. Linear, HF ``Conv1D`` and attention projections use their
            true input axis; a convolution its unfolded input patches (one norm per input channel and
            kernel position); packed q/k/v share the query input. All-reduced across DDP ranks; saved
            in checkpoints.
        score_batches: batches of input the statistics of ``score`` are gathered over before each update.
        remove_channels: with ``method="channel"``: prune whole units of coupled channel groups (traced
            on the first training batch: residual adds, depthwise convolutions, concatenations, norms,
            attention heads), zero their bias and norm entries too, and at the end of training
            physically remove them (:func:`~lightning_compress.remove_channels`), before
            ``QuantizeOnFitEnd`` converts. ``trainer.validate`` / ``test`` then run the slim model.
        verbose: 0 silent; 1 prints the per-layer table at the end of fit; 2 also a line per update.

    Example:
        >>> from lightning_compress import PruningCallback
        >>> callback = PruningCallback(0.9, method="magnitude", exclude=["backbone.net.5"])
        >>> callback.target_sparsity, callback.masks
        (0.9, mappingproxy({}))
    """

    VERBOSE_LEVELS = 2
    IDENTITY = ("target_sparsity", "method", "scope", "include", "exclude")
    SAVED = (
        *IDENTITY,
        "schedule",
        "initial_sparsity",
        "start_epoch",
        "end_epoch",
        "update_every_n_steps",
        "remove_channels",
        "score",
        "score_batches",
    )

    def __init__(
        self,
        target_sparsity: float,
        *,
        method: str = "magnitude",
        scope: str = "global",
        schedule: str = "cubic",
        initial_sparsity: float = 0.0,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        update_every_n_steps: int = DEFAULT_UPDATE_EVERY_N_STEPS,
        include: list[str] = list(DEFAULT_PRUNE_TYPES),  # noqa: B006 - never mutated; a plain list for the CLI
        exclude: list[str] = [],  # noqa: B006
        score: str = "magnitude",
        score_batches: int = DEFAULT_SCORE_BATCHES,
        remove_channels: bool = False,
        verbose: int = 1,
    ) -> None:
        super().__init__(verbose)
        _check_options(method, scope, score, score_batches, remove_channels)
        _check_arguments(
            target_sparsity, method, scope, schedule, initial_sparsity, start_epoch, end_epoch, update_every_n_steps
        )
        self.score = score
        self.score_batches = score_batches
        self.remove_channels = remove_channels
        self.target_sparsity = float(target_sparsity)
        self.method = method
        self.scope = scope
        self.schedule = schedule
        self.initial_sparsity = float(initial_sparsity)
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.update_every_n_steps = update_every_n_steps
        self.include = check_str_list("include", include)
        self.exclude = check_str_list("exclude", exclude)
        self._reset()

    def _reset(self) -> None:
        self._keeper: MaskKeeper | None = None
        self._masks: dict[str, Tensor] = {}  # CPU bool, the result of the last update
        self._window: PruningWindow | None = None
        self._last_update: int | None = None  # global step of the last mask update
        self._applied: float | None = None  # scheduled sparsity of the current masks
        self._achieved: float | None = None  # zeros among the selected weights, last measured
        self._loaded: Resumed | None = None  # read by load_state_dict, restored at fit start
        self._cut_off: set[str] = set()  # layers already reported as entirely pruned
        self._layouts: dict[str, WeightLayout] = {}  # parameter name -> layout, set by _select
        self._targets: list[Target] = []  # set by _select
        self._channels: ChannelRemoval | None = ChannelRemoval() if self.remove_channels else None
        self._statistics: ScoreStatistics | None = None  # set at fit start for a score that needs statistics

    # ------------------------------------------------------------------ public views

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """The current masks, read-only: ``parameter name -> CPU bool tensor`` (``True`` = kept).

        Empty before pruning starts. They stay available after fit.
        """
        return MappingProxyType(self._masks)

    @property
    def sparsity(self) -> float | None:
        """Achieved sparsity: the fraction of the selected weights that are exactly zero.

        Counted on the real weights at the last mask update, at each epoch end and at the end of
        fit; ``None`` before the first measurement.
        """
        return self._achieved

    @property
    def scheduled_sparsity(self) -> float | None:
        """The schedule's sparsity at the last mask update (``None`` before pruning starts)."""
        return self._applied

    @property
    def window(self) -> PruningWindow | None:
        """Where pruning happens on the optimizer-step axis (known once training starts)."""
        return self._window

    # ------------------------------------------------------------------ checks before training

    @override
    def _setup_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        self._reset()
        _check_epochs(self.start_epoch, self.end_epoch, trainer.max_epochs, trainer.max_steps)
        check_no_overlap(self, trainer.callbacks, pl_module)  # type: ignore[attr-defined]
        self._warn_left_out(trainer, pl_module)  # layers made in configure_model are not there yet

    def _select(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        targets = select_targets(pl_module, self.include, self.exclude)  # a tied weight is one target
        self._layouts = {t.param_name: t.layout for t in targets}  # Conv1D [in, out], packed q/k/v
        self._targets = targets
        return {t.param_name: t.weight for t in targets}

    # ------------------------------------------------------------------ fit lifecycle

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = self._select(pl_module)
        if self._channels is not None:
            self._channels.check_unsharded(weights.values())
        self._keeper = MaskKeeper(weights, trainer.optimizers, guard_all=may_touch_gradients(self, trainer, pl_module))
        self._install_loaded()

    def _install_loaded(self) -> None:
        """Install the state ``load_state_dict`` read (if any) and build the score statistics from it.

        Called at fit start, and at once by a load that comes after it: ``ModelParallelStrategy``
        restores callback states after ``on_fit_start`` (``restore_checkpoint_after_setup``).
        """
        assert self._keeper is not None
        if self._statistics is not None:
            self._statistics.close()
        saved = self._loaded.statistics if self._loaded is not None else None
        self._statistics = ScoreStatistics.for_score(self.score, self._targets, self.score_batches, saved)
        if self._loaded is not None:
            if self._loaded.install(self._keeper):
                self._masks = self._keeper.masks
            self._last_update, self._applied = self._loaded.last_update, self._loaded.scheduled_sparsity
            self._loaded = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = place_window(
            self.start_epoch,
            self.end_epoch,
            self.update_every_n_steps,
            batches=trainer.num_training_batches,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
            max_epochs=trainer.max_epochs if trainer.max_epochs is not None else -1,
            max_steps=trainer.max_steps,
        )
        if self._keeper is not None and self._masks:
            self._keeper.mask_optimizer_state()  # the optimizer state was restored after on_fit_start

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._channels is not None and not self._channels.ready and self._keeper is not None:
            guard = may_touch_gradients(self, trainer, pl_module)
            self._channels.prepare(pl_module, batch, self._keeper, guard, self._masks)
        self._maybe_update(trainer, pl_module, after_step=False)
        if self._statistics is not None:  # hooks on the batches before an update that changes the masks
            self._statistics.before_batch(self._window, trainer.global_step, self._changes)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._statistics is not None:
            self._statistics.collector.remove()
        self._maybe_update(trainer, pl_module, after_step=True)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._keeper is not None:
            self._keeper.mask_gradients(unwrap_optimizer(optimizer))
        if self._channels is not None:
            self._channels.mask_gradients(unwrap_optimizer(optimizer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._keeper is None or self._window is None or not self._window.started(trainer.global_step):
            return
        self._achieved = self._keeper.zeros_fraction()
        pl_module.log("pruning/sparsity", self._achieved, on_step=False, on_epoch=True, sync_dist=True)
        pl_module.log("pruning/target", self._applied or 0.0, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before any on_fit_end, so QuantizeOnFitEnd converts the slim model whatever the callback order
        if self._channels is not None:
            if self._keeper is not None:
                self._achieved = self._keeper.zeros_fraction()
            self._channels.remove(trainer, pl_module)

    @property
    def removed_channels(self) -> Mapping[str, tuple[int, ...]]:
        """``{layer name: new weight shape}`` of the layers ``remove_channels=True`` shrank (after fit)."""
        return MappingProxyType(self._channels.removed if self._channels is not None else {})

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._keeper is not None and not (self._channels is not None and self._channels.removed):
            self._achieved = self._keeper.zeros_fraction()
        if self.verbose >= 1 and trainer.is_global_zero:
            selected = len(self._keeper.params) if self._keeper is not None else 0
            rank_zero_info(summary(pl_module, self._achieved, selected, self.target_sparsity, self.method))

    @override
    def _release(self) -> None:
        """Drop the optimizer hooks and every reference to the model; the CPU masks stay readable."""
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self._channels is not None:
            self._channels.close()
        if self._statistics is not None:
            self._statistics.close()
        self._loaded = None

    # ------------------------------------------------------------------ mask updates

    def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, after_step: bool) -> None:
        """Recompute the masks if the schedule asks for it now (when: see ``update_due``)."""
        window, step = self._window, trainer.global_step
        if window is None or self._keeper is None:
            return
        if not update_due(window, step, after_step, self._last_update, self._applied):
            return
        self._last_update = step
        if self._changes(step):  # else the same sparsity, and pruned weights stay pruned: the same masks
            self._update(trainer, pl_module, self._keeper, self._target_at(window, step))
        if self._statistics is not None:
            self._statistics.collector.reset()  # the next update measures afresh

    def _target_at(self, window: PruningWindow, step: int) -> float:
        return sparsity_at(window.progress(step), self.target_sparsity, self.initial_sparsity, self.schedule)

    def _changes(self, step: int) -> bool:
        """Whether the scheduled update at ``step`` will recompute the masks (its sparsity is new)."""
        window = self._window
        return window is not None and (self._applied is None or self._target_at(window, step) != self._applied)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, keeper: MaskKeeper, target: float) -> None:
        # every rank takes part in the all-reduce of the statistics; rank 0 decides
        stats = self._statistics.norms(trainer, pl_module, "PruningCallback") if self._statistics is not None else None
        masks = decide_masks(
            trainer,
            keeper.params,
            target,
            self.method,
            self.scope,
            previous=self._masks or None,
            layouts=self._layouts,
            score=self.score,
            statistics=stats,
            channels=self._channels,
        )
        keeper.set_masks(masks)
        self._masks = keeper.masks
        if self._channels is not None:
            self._channels.set_masks(self._masks)
        self._applied = target
        warn_cut_off(self._masks, self._cut_off, trainer.global_step, self.scope, self.method, self.score)
        self._achieved = keeper.zeros_fraction()
        pl_module.log("pruning/sparsity", self._achieved, on_step=True, on_epoch=False)
        pl_module.log("pruning/target", target, on_step=True, on_epoch=False)
        if self.verbose >= 2:
            rank_zero_info(
                f"PruningCallback: step {trainer.global_step}, scheduled sparsity {target:.2%},"
                f" achieved {self._achieved:.2%}"
            )

    # ------------------------------------------------------------------ checkpointing

    @override
    def _state(self) -> dict[str, Any]:
        return {
            "last_update": self._last_update,
            "scheduled_sparsity": self._applied,
            "achieved_sparsity": self._achieved,
            "masks": {name: mask.clone() for name, mask in self._masks.items()},
            "statistics": self._statistics.collector.state() if self._statistics is not None else None,
        }

    @override
    def _load_state(self, state: dict[str, Any]) -> None:
        self._loaded = Resumed.read(state)
        self._masks = dict(self._loaded.masks)
        self._achieved = self._loaded.achieved_sparsity
        if self._keeper is not None:  # the fit has started (ModelParallelStrategy restores callbacks late)
            self._install_loaded()
