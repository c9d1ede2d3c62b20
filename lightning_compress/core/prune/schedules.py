r"""How much to prune, and when: sparsity schedules counted in optimizer steps.

A schedule maps the *progress* ``p`` through the pruning window (0 at its first step, 1 at its
last) to the fraction of the selected weights that should be zero:

* ``cubic`` (Zhu & Gupta 2017, "To prune, or not to prune"):
  :math:`s(p) = s_f + (s_i - s_f)(1 - p)^3`, which prunes fast while the network still has many
  redundant weights and slowly as it approaches the target;
* ``linear``: :math:`s(p) = s_i + (s_f - s_i)\,p`;
* ``constant``: :math:`s(p) = s_f` (one shot at the start of the window).

:class:`PruningWindow` places the window on the optimizer-step axis and says at which steps the
masks are recomputed: every ``update_every`` steps from its start, and always at its end, so the
target is reached exactly. Nothing here knows about Lightning; the callback turns epochs into steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_compress.errors import CompressionConfigError, config_error

__all__ = [
    "DEFAULT_PRUNE_FRACTION",
    "SCHEDULES",
    "PruningWindow",
    "default_end_epoch",
    "default_end_step",
    "place_window",
    "sparsity_at",
    "steps_per_epoch",
]

SCHEDULES: tuple[str, ...] = ("cubic", "linear", "constant")
"""Names accepted by :func:`sparsity_at`."""

DEFAULT_PRUNE_FRACTION = 0.5
"""Share of the training left after the start of pruning that the default window covers.

The rest is fine-tuning at full sparsity, where the surviving weights recover the accuracy lost
to the last pruning steps (see the pruning guide for the measurements behind the choice).
"""


def sparsity_at(progress: float, target: float, initial: float = 0.0, schedule: str = "cubic") -> float:
    """The sparsity a schedule asks for at ``progress`` through the pruning window.

    Args:
        progress: position in the window, clamped to ``[0, 1]``.
        target: the final sparsity :math:`s_f`.
        initial: the sparsity at the start of the window :math:`s_i` (ignored by ``constant``).
        schedule: ``"cubic"``, ``"linear"`` or ``"constant"``.

    Returns:
        The fraction of weights to zero, between ``initial`` and ``target``.

    Raises:
        ValueError: for an unknown schedule (the callback validates its arguments first).

    Example:
        >>> round(sparsity_at(0.5, target=0.8), 6)  # 0.8 - 0.8 * 0.5 ** 3
        0.7
        >>> sparsity_at(0.5, target=0.8, schedule="linear")
        0.4
        >>> sparsity_at(0.0, target=0.8, schedule="constant")
        0.8
    """
    p = min(max(float(progress), 0.0), 1.0)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "constant" or p == 1.0:
        return target  # exactly, whatever rounding the formulas below would give
    if p == 0.0:
        return initial
    if schedule == "cubic":
        return target + (initial - target) * (1.0 - p) ** 3
    return initial + (target - initial) * p


def steps_per_epoch(batches: int, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps in an epoch of ``batches`` training batches.

    Lightning steps on the last batch of an epoch even when its accumulation window is partial, so
    an epoch of 10 batches with ``accumulate_grad_batches=4`` makes 3 steps.

    Example:
        >>> steps_per_epoch(10, 4)
        3
    """
    return math.ceil(batches / accumulate_grad_batches)


def default_end_epoch(start_epoch: int, max_epochs: int, fraction: float = DEFAULT_PRUNE_FRACTION) -> int:
    """The last pruning epoch when the user leaves ``end_epoch`` unset.

    The window covers ``fraction`` of the epochs from ``start_epoch`` to ``max_epochs`` (at least one
    epoch), leaving the rest for fine-tuning at full sparsity. Epochs are counted from 0, and the
    target is reached at the *end* of the returned epoch.

    Example:
        >>> default_end_epoch(0, 30)  # prune during epochs 0-14, fine-tune during 15-29
        14
        >>> default_end_epoch(0, 1), default_end_epoch(0, 2), default_end_epoch(2, 10)
        (0, 0, 5)
    """
    remaining = max(max_epochs - start_epoch, 1)
    return start_epoch + max(math.ceil(fraction * remaining - 1e-9), 1) - 1


def default_end_step(start_step: int, max_steps: int, fraction: float = DEFAULT_PRUNE_FRACTION) -> int:
    """The step at which the target is reached when a run is bounded by ``max_steps``.

    Example:
        >>> default_end_step(0, 1000)
        500
    """
    remaining = max(max_steps - start_step, 1)
    return start_step + max(math.ceil(fraction * remaining - 1e-9), 1)


@dataclass(frozen=True)
class PruningWindow:
    """Where pruning happens on the optimizer-step axis.

    ``step`` is the number of optimizer steps taken so far (Lightning's ``trainer.global_step``).
    The masks are first computed when ``step == start`` (before the first step of the window), then
    every ``update_every`` steps, and a last time when ``step == end`` (after the window's last
    step), where the sparsity reaches the target.

    Args:
        start: steps taken before pruning starts.
        end: steps taken when the target is reached (``end >= start``).
        update_every: optimizer steps between two mask updates (``>= 1``).

    Example:
        >>> window = PruningWindow(start=10, end=20, update_every=4)
        >>> [t for t in range(25) if window.is_update(t)]
        [10, 14, 18, 20]
        >>> window.progress(15)
        0.5
    """

    start: int
    end: int
    update_every: int

    def __post_init__(self) -> None:
        if self.end < self.start or self.update_every < 1 or self.start < 0:
            raise ValueError(f"invalid pruning window {self}")

    def progress(self, step: int) -> float:
        """Position of ``step`` in the window: 0 at ``start``, 1 at ``end`` and after."""
        if step >= self.end:
            return 1.0
        if step <= self.start:
            return 0.0
        return (step - self.start) / (self.end - self.start)

    def is_update(self, step: int) -> bool:
        """Whether the masks are recomputed when ``step`` optimizer steps have been taken."""
        if step < self.start or step > self.end:
            return False
        return step == self.end or (step - self.start) % self.update_every == 0

    def started(self, step: int) -> bool:
        """Whether pruning has begun (masks exist) once ``step`` steps have been taken."""
        return step >= self.start


def place_window(
    start_epoch: int,
    end_epoch: int | None,
    update_every: int,
    *,
    batches: float,
    accumulate_grad_batches: int,
    max_epochs: int,
    max_steps: int,
) -> PruningWindow:
    """The pruning window in optimizer steps, once the number of training batches per epoch is known.

    Args:
        start_epoch: first epoch of pruning.
        end_epoch: last epoch of pruning, or ``None`` for the default (half of the run).
        update_every: optimizer steps between mask updates.
        batches: training batches per epoch (``inf`` for data of unknown length).
        accumulate_grad_batches: batches per optimizer step.
        max_epochs: the Trainer's limit, ``-1`` for none.
        max_steps: the Trainer's limit, ``-1`` for none.

    Raises:
        CompressionConfigError: if the window cannot be placed or ends after ``max_steps``.
    """
    if batches == math.inf:  # an iterable data set of unknown length: only steps can place the window
        if max_steps == -1 or start_epoch != 0 or end_epoch is not None:
            raise CompressionConfigError(
                "Expected `start_epoch=0`, `end_epoch=None` and a Trainer with `max_steps` when the training"
                f" data has no length, but got start_epoch={start_epoch}, end_epoch={end_epoch},"
                f" max_steps={max_steps}. Epoch boundaries are unknown in advance, so the window is placed in steps."
            )
        return PruningWindow(0, default_end_step(0, max_steps), update_every)
    per_epoch = steps_per_epoch(int(batches), accumulate_grad_batches)
    start = start_epoch * per_epoch
    epoch_bound = max_epochs * per_epoch if max_epochs != -1 else math.inf
    if end_epoch is not None:
        end = (end_epoch + 1) * per_epoch
    elif max_steps != -1 and max_steps < epoch_bound:
        if start >= max_steps:
            raise config_error(
                "start_epoch",
                f"an epoch that starts before max_steps={max_steps} ({per_epoch} optimizer steps per epoch)",
                start_epoch,
            )
        end = default_end_step(start, max_steps)
    else:
        end = (default_end_epoch(start_epoch, max_epochs) + 1) * per_epoch
    if max_steps != -1 and end > max_steps:
        raise config_error(
            "end_epoch",
            f"an epoch that ends by max_steps={max_steps} ({per_epoch} optimizer steps per epoch)",
            end_epoch,
            f"Pruning would reach its target after {end} steps, which this run never takes.",
        )
    return PruningWindow(start, end, update_every)
