from __future__ import annotations

import itertools
import math

import pytest

from lightning_compress.core.prune.schedules import (
    PruningWindow,
    default_end_epoch,
    default_end_step,
    sparsity_at,
    steps_per_epoch,
)


def test_cubic_is_zhu_gupta() -> None:
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, written out for t0=100, n*dt=400.
    s_i, s_f, t0, span = 0.1, 0.9, 100, 400
    window = PruningWindow(start=t0, end=t0 + span, update_every=50)
    for t in range(t0, t0 + span + 1, 50):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / span) ** 3
        got = sparsity_at(window.progress(t), target=s_f, initial=s_i, schedule="cubic")
        assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_schedules_start_at_initial_end_exactly_at_target_and_never_decrease(schedule: str) -> None:
    values = [sparsity_at(p / 100, target=0.8, initial=0.2, schedule=schedule) for p in range(101)]
    assert values[0] == 0.2
    assert values[-1] == 0.8  # exact, not approx: the callback must reach the target exactly
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert sparsity_at(2.0, target=0.8, schedule=schedule) == 0.8  # clamped past the end
    assert sparsity_at(-1.0, target=0.8, initial=0.2, schedule=schedule) == 0.2


def test_linear_midpoint_and_constant() -> None:
    assert sparsity_at(0.25, target=0.8, initial=0.4, schedule="linear") == pytest.approx(0.5)
    assert all(sparsity_at(p, target=0.7, initial=0.1, schedule="constant") == 0.7 for p in (0.0, 0.3, 1.0))


def test_cubic_prunes_faster_early_than_linear() -> None:
    assert sparsity_at(0.2, target=0.9, schedule="cubic") > sparsity_at(0.2, target=0.9, schedule="linear")


def test_unknown_schedule_raises() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        sparsity_at(0.5, target=0.5, schedule="exp")


@pytest.mark.parametrize(("batches", "accumulate", "expected"), [(10, 1, 10), (10, 4, 3), (12, 4, 3), (1, 8, 1)])
def test_steps_per_epoch_counts_the_partial_last_window(batches: int, accumulate: int, expected: int) -> None:
    assert steps_per_epoch(batches, accumulate) == expected


def test_window_update_steps_include_start_every_n_and_end() -> None:
    window = PruningWindow(start=6, end=21, update_every=5)
    assert [t for t in range(40) if window.is_update(t)] == [6, 11, 16, 21]
    window = PruningWindow(start=0, end=7, update_every=3)
    assert [t for t in range(40) if window.is_update(t)] == [0, 3, 6, 7]
    one_shot = PruningWindow(start=4, end=4, update_every=100)
    assert [t for t in range(10) if one_shot.is_update(t)] == [4]
    assert one_shot.progress(3) == 0.0 and one_shot.progress(4) == 1.0


def test_window_progress_and_started() -> None:
    window = PruningWindow(start=10, end=30, update_every=1)
    assert [window.progress(t) for t in (0, 10, 15, 30, 99)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert not window.started(9) and window.started(10)


@pytest.mark.parametrize("bad", [dict(start=5, end=4, update_every=1), dict(start=0, end=4, update_every=0)])
def test_window_rejects_inconsistent_bounds(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="invalid pruning window"):
        PruningWindow(**bad)


@pytest.mark.parametrize(
    ("start", "max_epochs", "expected"),
    [(0, 1, 0), (0, 2, 0), (0, 3, 1), (0, 4, 1), (0, 30, 14), (0, 31, 15), (5, 6, 5), (2, 10, 5)],
)
def test_default_end_epoch_leaves_fine_tuning_when_possible(start: int, max_epochs: int, expected: int) -> None:
    end = default_end_epoch(start, max_epochs)
    assert end == expected
    assert start <= end <= max_epochs - 1
    if max_epochs - start >= 2:
        assert end < max_epochs - 1  # at least one epoch at full sparsity
    assert end - start + 1 == max(math.ceil(0.5 * (max_epochs - start)), 1)


def test_default_end_step() -> None:
    assert default_end_step(0, 1000) == 500
    assert default_end_step(100, 301) == 201
    assert default_end_step(7, 8) == 8
