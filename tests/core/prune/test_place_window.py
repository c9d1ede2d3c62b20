"""Where PruningCallback places its window, as a pure function of its arguments and the Trainer's limits."""

from __future__ import annotations

import math

import pytest

from lightning_compress import CompressionConfigError
from lightning_compress.core.prune.schedules import PruningWindow, place_window


def _window(start_epoch=0, end_epoch=None, batches=20, accumulate=1, max_epochs=10, max_steps=-1) -> PruningWindow:
    return place_window(
        start_epoch,
        end_epoch,
        5,
        batches=batches,
        accumulate_grad_batches=accumulate,
        max_epochs=max_epochs,
        max_steps=max_steps,
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(), (0, 100)),  # default: the first half of 10 epochs x 20 steps
        (dict(start_epoch=2, end_epoch=4), (40, 100)),  # from the start of epoch 2 to the end of epoch 4
        (dict(accumulate=3), (0, 35)),  # ceil(20 / 3) = 7 steps per epoch
        (dict(start_epoch=3, max_epochs=4), (60, 80)),  # one epoch left: it is the window
        (dict(max_epochs=-1, max_steps=90), (0, 45)),  # bounded by steps: half of them
        (dict(max_epochs=10, max_steps=50), (0, 25)),  # max_steps ends the run before max_epochs
        (dict(start_epoch=1, max_epochs=10, max_steps=50), (20, 35)),
        (dict(end_epoch=1, max_steps=40), (0, 40)),  # ends exactly at max_steps: allowed
        (dict(batches=math.inf, max_epochs=-1, max_steps=30), (0, 15)),  # unknown length: steps only
    ],
)
def test_window_placement(kwargs, expected) -> None:
    window = _window(**kwargs)
    assert (window.start, window.end, window.update_every) == (*expected, 5)


def test_end_past_max_steps_is_rejected() -> None:
    with pytest.raises(CompressionConfigError, match=r"which this run never takes"):
        _window(end_epoch=2, max_steps=59)
