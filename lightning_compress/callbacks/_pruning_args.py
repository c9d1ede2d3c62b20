"""Argument checks of ``PruningCallback`` and the placement of its window on the optimizer-step axis.

Plain functions of the callback's arguments and the Trainer's limits (no Trainer object), so each
rule can be read and tested on its own.
"""

from __future__ import annotations

import math

from lightning_compress.core.masks import METHODS, SCOPES, parse_nm
from lightning_compress.core.schedules import (
    SCHEDULES,
    PruningWindow,
    default_end_epoch,
    default_end_step,
    steps_per_epoch,
)
from lightning_compress.errors import CompressionConfigError, check_choice, check_number, config_error


def _check_arguments(
    target_sparsity: float,
    method: str,
    scope: str,
    schedule: str,
    initial_sparsity: float,
    start_epoch: int,
    end_epoch: int | None,
    update_every_n_steps: int,
) -> None:
    """The constructor's checks: everything that does not need the Trainer."""
    check_number("target_sparsity", target_sparsity, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(method, str) or (method not in ("magnitude", "channel") and parse_nm(method) is None):
        quoted = [repr(m) for m in METHODS]
        raise config_error("method", f"one of {', '.join(quoted[:-1])} or {quoted[-1]} such as '2:4'", method)
    nm = parse_nm(method)
    if nm is not None:
        n, m = nm
        if not 0 < n < m:
            raise config_error("method", "an N:M pattern with 0 < N < M such as '2:4'", method)
        if not math.isclose(target_sparsity, 1 - n / m, abs_tol=1e-6):
            raise config_error(
                "target_sparsity",
                f"{1 - n / m:g} for method {method!r}",
                target_sparsity,
                f"An N:M pattern keeps {n} of every {m} weights, so it can only mean a sparsity of 1 - N/M.",
            )
    check_choice("scope", scope, SCOPES)
    check_choice("schedule", schedule, SCHEDULES)
    check_number("initial_sparsity", initial_sparsity, low=0.0, high=1.0, high_inclusive=False)
    if initial_sparsity > target_sparsity:
        raise config_error("initial_sparsity", f"at most target_sparsity={target_sparsity:g}", initial_sparsity)
    check_number("start_epoch", start_epoch, low=0, integer=True)
    if end_epoch is not None:
        check_number("end_epoch", end_epoch, low=0, integer=True)
        if end_epoch < start_epoch:
            raise config_error("end_epoch", f"None or an epoch >= start_epoch={start_epoch}", end_epoch)
    check_number("update_every_n_steps", update_every_n_steps, low=1, integer=True)


def _check_epochs(start_epoch: int, end_epoch: int | None, max_epochs: int, max_steps: int) -> None:
    """The checks of ``setup``: the window must fit in the run (``-1`` means unbounded)."""
    if max_epochs != -1:
        if start_epoch >= max_epochs:
            raise config_error(
                "start_epoch", f"an epoch before max_epochs={max_epochs} (epochs count from 0)", start_epoch
            )
        if end_epoch is not None and end_epoch >= max_epochs:
            raise config_error(
                "end_epoch",
                f"None or an epoch before max_epochs={max_epochs} (epochs count from 0)",
                end_epoch,
                "The target would never be reached.",
            )
    elif max_steps == -1 and end_epoch is None:
        raise config_error(
            "end_epoch",
            "an epoch when the Trainer has neither max_epochs nor max_steps",
            end_epoch,
            "Without them the end of training, and so the default end of pruning, is unknown.",
        )


def _place_window(
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
