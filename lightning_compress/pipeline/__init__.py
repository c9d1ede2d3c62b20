"""The one-command pipeline: train dense, compress, validate both, and compare them in one table.

:class:`CompressTrainer` is a ``Trainer`` with a :meth:`~CompressTrainer.compress` verb (the
command line's ``lightning-compress compress``); :class:`ComparisonResult` holds the numbers.
"""

from lightning_compress.pipeline.defaults import (
    DEFAULT_CALLBACKS,
    DEFAULT_COMPRESS_EPOCHS,
    PipelineData,
    default_callbacks,
)
from lightning_compress.pipeline.figure import write_figure
from lightning_compress.pipeline.measure import Measurement, measure, measure_latencies
from lightning_compress.pipeline.result import ComparisonResult
from lightning_compress.pipeline.trainer import CompressTrainer

__all__ = [
    "DEFAULT_CALLBACKS",
    "DEFAULT_COMPRESS_EPOCHS",
    "ComparisonResult",
    "CompressTrainer",
    "Measurement",
    "PipelineData",
    "default_callbacks",
    "measure",
    "measure_latencies",
    "write_figure",
]
