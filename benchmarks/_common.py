"""What the benchmark scripts share: one quiet Trainer, and int8 conversion as ``QuantizeOnFitEnd`` does it.

A script imports it after putting its own folder first on ``sys.path`` (so that it also works when a
smoke test loads the script from its path)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import bench_trainer, to_int8
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_compress.core.quant.convert import quantize

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""Nothing printed or written that a measurement did not ask for."""


def bench_trainer(**kwargs: Any) -> pl.Trainer:
    """A ``Trainer`` with :data:`QUIET` settings; ``kwargs`` are the script's own (and override them)."""
    return pl.Trainer(**{**QUIET, **kwargs})


def first_batches(batches: Iterable[Any], n: int) -> list[Any]:
    """The first ``n`` batches of a loader: the calibration ``QuantizeOnFitEnd`` uses (``calibration_batches``)."""
    return list(islice(batches, n))


def to_int8(model: nn.Module, mode: str = "dynamic", per_channel: bool = True, calibration: Iterable[Any] = ()) -> Any:
    """An int8 copy of ``model``, converted as ``QuantizeOnFitEnd`` does (``core.quant.convert.quantize``).

    Static scales are observed on ``calibration`` (batches, fed as the callback feeds them); a layer
    they never reach stays dynamic, as in the callback. The copy is returned in eval mode; ``model``
    is untouched.
    """
    converted = copy.deepcopy(model).eval()
    quantize(converted, mode, per_channel, calibration=calibration)
    return converted
