"""Fits that run side by side, one thread each, taking their training steps strictly in turn, each step timed.

A :class:`Baton` passes from one fit to the next at every step, so any drift of the machine hits
them alike. A step is timed from :class:`StepStart` (put it first in the fit's callbacks) to
:class:`StepEnd` (put it last): forward, backward, optimizer step and every other callback's hooks.
The first epoch is a warm-up and is not timed. :func:`in_turn` runs the fits.

A script imports it after putting its own folder first on ``sys.path``::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _step_timing import Baton, StepEnd, StepStart, in_turn
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

_T = TypeVar("_T")


class Baton:
    """Lets the fits running in parallel threads take their training steps strictly in turn."""

    def __init__(self, names: list[str]) -> None:
        self.cond = threading.Condition()
        self.names = list(names)
        self.turn = 0

    def _advance(self) -> None:
        if self.names:
            self.turn = (self.turn + 1) % len(self.names)
        self.cond.notify_all()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def release(self, name: str) -> None:
        with self.cond:
            self._advance()

    def finish(self, name: str) -> None:
        """Leave the rotation (at the end of fit, or when it fails)."""
        with self.cond:
            i = self.names.index(name)
            current = self.names[self.turn]
            self.names.pop(i)
            if self.names:
                self.turn = self.names.index(current) if current != name else i % len(self.names)
            self.cond.notify_all()


class StepStart(Callback):
    """Waits for the fit's turn, then starts the step's clock: ``clock="cpu"`` (thread CPU time) or wall time."""

    def __init__(self, name: str, baton: Baton, clock: str, sync: bool) -> None:
        self.name, self.baton, self.sync = name, baton, sync
        self.start = 0.0
        # The CPU time of this thread: neither other processes on a shared machine nor the other
        # fits' threads stretch it (torch runs its kernels in the calling thread with one thread).
        self.now = time.thread_time if clock == "cpu" else time.perf_counter

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.baton.wait(self.name)
        if self.sync:
            torch.cuda.synchronize()
        self.start = self.now()


class StepEnd(Callback):
    """Stops the clock of ``start``, keeps the time after the warm-up epoch in ``times``, passes the baton."""

    def __init__(self, start: StepStart) -> None:
        self.start = start
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.start.sync:
            torch.cuda.synchronize()
        elapsed = self.start.now() - self.start.start
        if trainer.current_epoch > 0:  # epoch 0 is the warm-up
            self.times.append(elapsed)
        self.start.baton.release(self.start.name)


def in_turn(names: list[str], fit: Callable[[str, Baton], _T]) -> dict[str, _T]:
    """``fit(name, baton)`` for every name, each in its own thread, their training steps taken in turn.

    A fit leaves the rotation when it returns or fails; the first error is raised here.
    """
    baton = Baton(names)
    results: dict[str, _T] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            results[name] = fit(name, baton)
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return results
