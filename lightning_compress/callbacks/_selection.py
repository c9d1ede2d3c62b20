"""What the callbacks say about their selection: large parts of the model a default selection leaves out."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_compress.core.selection import Target, left_out_message

__all__ = ["warn_left_out"]

_SAID: weakref.WeakKeyDictionary[pl.Trainer, set[str]] = weakref.WeakKeyDictionary()


def warn_left_out(
    trainer: pl.Trainer,
    model: nn.Module,
    targets: Sequence[Target],
    include: Sequence[str],
    exclude: Sequence[str],
    default: Sequence[str],
    who: str,
    left_as: str = "dense",
) -> str | None:
    """Warn, on rank zero and once per Trainer, when the default ``include`` leaves much of ``model`` out.

    Nothing is said when the user chose ``include``: they asked for exactly that selection; modules
    their ``exclude`` names are not counted.

    Returns:
        The message, when one was warned.
    """
    if list(include) != list(default):
        return None
    message = left_out_message(model, targets, exclude, left_as=left_as)
    if message is None:
        return None
    said = _SAID.setdefault(trainer, set())
    if message in said:
        return None
    said.add(message)
    rank_zero_warn(f"{who}: {message}")
    return message
