"""Argument checks of ``PruningCallback`` (its window is placed by ``core.prune.schedules.place_window``).

Plain functions of the callback's arguments and the Trainer's limits (no Trainer object), so each
rule can be read and tested on its own.
"""

from __future__ import annotations

import math

from lightning_compress.core.prune.masks import SCOPES, parse_nm
from lightning_compress.core.prune.patterns import describe_patterns, is_pattern
from lightning_compress.core.prune.schedules import SCHEDULES
from lightning_compress.core.prune.scores import score_names
from lightning_compress.errors import check_choice, check_number, config_error


def _check_options(method: str, scope: str, score: str, score_batches: int, remove_channels: bool) -> None:
    """The first checks of the constructor: the score, and what ``method`` and ``remove_channels`` allow."""
    check_choice("score", score, score_names())
    check_number("score_batches", score_batches, low=1, integer=True)
    if scope == "row" and method == "channel":
        raise config_error(
            "scope", "'global' or 'layer' with method='channel'", scope, "A row is a whole output channel."
        )
    if remove_channels and score != "magnitude":
        raise config_error("score", "'magnitude' with remove_channels=True", score)
    if not isinstance(remove_channels, bool):
        raise config_error("remove_channels", "True or False", remove_channels)
    if remove_channels and method != "channel":
        raise config_error(
            "remove_channels",
            "False unless method='channel'",
            remove_channels,
            f"Only whole channels can be removed; method={method!r} zeroes single weights.",
        )


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
    """The constructor's checks: everything that does not need the Trainer (after :func:`_check_options`)."""
    check_number("target_sparsity", target_sparsity, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(method, str) or not is_pattern(method):
        choices = describe_patterns()  # the table of mask patterns: built-ins and registered ones
        raise config_error("method", f"one of {', '.join(choices[:-1])} or {choices[-1]}", method)
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


def _check_epochs(start_epoch: int, end_epoch: int | None, max_epochs: int | None, max_steps: int) -> None:
    """The checks of ``setup``: the window must fit in the run (``-1`` or ``None`` means unbounded)."""
    if max_epochs is None:
        max_epochs = -1
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
