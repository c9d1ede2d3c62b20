"""Warnings that Lightning and its dependencies print on every run and that no user can act on.

The command line and :meth:`~lightning_compress.pipeline.CompressTrainer.compress` silence exactly
these messages (matched in full, by category), nothing else; the test of the examples fails on any
warning not listed here. Each entry says why it is harmless. They also drop Lightning's
advertising log lines (``💡 Tip: ... install litlogger / litmodels``), printed once per Trainer.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "HARMLESS_MODULE_WARNINGS",
    "HARMLESS_WARNINGS",
    "IN_MEMORY_DATA_WARNINGS",
    "LIGHTNING_INFO_LOGGERS",
    "lightning_info_filtered",
    "quiet_known_warnings",
]

LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
"""The loggers behind Lightning's ``rank_zero_info`` lines."""


HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning's pytree helper calls an API that newer torch releases deprecate; printed on every fit.
    (
        re.escape(
            "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and"
            " treespec.is_leaf()` instead."
        ),
        FutureWarning,
    ),
    # Lightning telling that it logs to CSV when TensorBoard is not installed: logs still get written.
    (
        re.escape("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the `lightning.pytorch`")
        + ".*",
        UserWarning,
    ),
    # Lightning 2.x still calls jsonargparse APIs that jsonargparse 4.49+ deprecates (handled below, by module).
)
"""``(message regex, category)`` pairs silenced in every run of the command line and the pipeline."""

HARMLESS_MODULE_WARNINGS: tuple[tuple[str, str], ...] = (
    # jsonargparse deprecations raised by LightningCLI's own calls (``skip_none``, ``add_instantiator``,
    # ``instantiate_classes``): attributed to lightning.pytorch.cli, nothing a user's config can change.
    ("jsonargparse._deprecated.JsonargparseDeprecationWarning", r"lightning\.pytorch\.cli"),
)
"""``(category path, module regex)``: every warning of that category that is attributed to that module."""

IN_MEMORY_DATA_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # The demo data sets are tensors in memory: worker processes would only add start-up time.
    (r"The '\w+_dataloader' does not have many workers which may be a bottleneck\..*", UserWarning),
)
"""Silenced only while the data come from :class:`~lightning_compress.demo.DigitsDataModule`."""


class _DropRecords(logging.Filter):
    def __init__(self, drop_all: bool) -> None:
        super().__init__()
        self.drop_all = drop_all

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.drop_all or str(record.msg).startswith("💡 Tip:"))


@contextmanager
def lightning_info_filtered(drop_all: bool = False) -> Iterator[None]:
    """Drop Lightning's advertising tips (or, with ``drop_all``, all its info lines) inside the block."""
    drop = _DropRecords(drop_all)
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


@contextmanager
def quiet_known_warnings(in_memory_data: bool = False) -> Iterator[None]:
    """Silence :data:`HARMLESS_WARNINGS` (and :data:`IN_MEMORY_DATA_WARNINGS`) inside the block.

    The filters are restored on exit, so a caller's own warning settings are left as they were.
    Lightning's advertising tips are dropped from its log too.
    """
    with warnings.catch_warnings(), lightning_info_filtered():
        entries = HARMLESS_WARNINGS + (IN_MEMORY_DATA_WARNINGS if in_memory_data else ())
        for message, category in entries:
            warnings.filterwarnings("ignore", message=message, category=category)
        for category_path, module in HARMLESS_MODULE_WARNINGS:
            found = _category(category_path)
            if found is not None:
                warnings.filterwarnings("ignore", category=found, module=module)
        yield


def _category(path: str) -> type[Warning] | None:
    module, _, name = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # another jsonargparse version: nothing of that kind to silence
        return None
    return found if isinstance(found, type) and issubclass(found, Warning) else None
