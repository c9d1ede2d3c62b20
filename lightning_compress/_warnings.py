"""Warnings that Lightning and its dependencies print on every run and that no user can act on.

The command line and :meth:`~lightning_compress.pipeline.CompressTrainer.compress` silence exactly
these messages (matched in full, by category), nothing else; the test of the examples fails on any
warning not listed here. Each entry says why it is harmless.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["HARMLESS_WARNINGS", "IN_MEMORY_DATA_WARNINGS", "quiet_known_warnings"]

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
    # jsonargparse deprecating an argument that Lightning's own SaveConfigCallback passes.
    (
        r"\s*skip_none parameter was deprecated in v4\.49\.0 and will be removed in v5\.0\.0\."
        r" Instead use skip_unset\.",
        DeprecationWarning,
    ),
    (r"\s*By default only one JsonargparseDeprecationWarning per type is shown\..*", DeprecationWarning),
)
"""``(message regex, category)`` pairs silenced in every run of the command line and the pipeline."""

IN_MEMORY_DATA_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # The demo data sets are tensors in memory: worker processes would only add start-up time.
    (r"The '\w+_dataloader' does not have many workers which may be a bottleneck\..*", UserWarning),
)
"""Silenced only while the data come from :class:`~lightning_compress.demo.DigitsDataModule`."""


@contextmanager
def quiet_known_warnings(in_memory_data: bool = False) -> Iterator[None]:
    """Silence :data:`HARMLESS_WARNINGS` (and :data:`IN_MEMORY_DATA_WARNINGS`) inside the block.

    The filters are restored on exit, so a caller's own warning settings are left as they were.
    """
    with warnings.catch_warnings():
        entries = HARMLESS_WARNINGS + (IN_MEMORY_DATA_WARNINGS if in_memory_data else ())
        for message, category in entries:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
