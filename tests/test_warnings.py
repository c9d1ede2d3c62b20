from __future__ import annotations

import logging
import warnings

import pytest
from jsonargparse._deprecated import JsonargparseDeprecationWarning
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from lightning_compress._warnings import lightning_info_filtered, quiet_known_warnings

LEAFSPEC = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"
    " instead."
)
WORKERS = (
    "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider increasing the value of"
    " the `num_workers` argument` to `num_workers=7` in the `DataLoader` to improve performance."
)


def _emitted(in_memory_data: bool = False) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_known_warnings(in_memory_data):
            warnings.warn(LEAFSPEC, FutureWarning, stacklevel=1)
            warnings.warn(WORKERS, PossibleUserWarning, stacklevel=1)
            warnings.warn(
                "Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the"
                " `lightning.pytorch` package, due to ...",
                UserWarning,
                stacklevel=1,
            )
            # jsonargparse deprecations are silenced when Lightning's CLI module raised them, only
            warnings.warn_explicit(
                "deprecated", JsonargparseDeprecationWarning, "cli.py", 1, module="lightning.pytorch.cli"
            )
            warnings.warn_explicit("deprecated here", JsonargparseDeprecationWarning, "mine.py", 1, module="mine")
            warnings.warn(LEAFSPEC, UserWarning, stacklevel=1)  # the right text with another category
            warnings.warn("anything else", UserWarning, stacklevel=1)
    return [str(w.message) for w in caught]


def test_only_the_listed_warnings_are_silenced():
    assert _emitted() == [WORKERS, "deprecated here", LEAFSPEC, "anything else"]
    assert _emitted(in_memory_data=True) == ["deprecated here", LEAFSPEC, "anything else"]


def test_filters_are_restored():
    before = list(warnings.filters)
    with quiet_known_warnings(in_memory_data=True):
        assert len(warnings.filters) > len(before)
    assert warnings.filters == before


@pytest.mark.parametrize(("drop_all", "kept"), [(False, ["GPU available: False"]), (True, [])])
def test_lightning_tips_are_dropped(caplog, drop_all, kept):
    with caplog.at_level(logging.INFO), lightning_info_filtered(drop_all=drop_all):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing something")
        rank_zero_info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == kept
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: after the block")
    assert [r.getMessage() for r in caplog.records] == ["💡 Tip: after the block"]
