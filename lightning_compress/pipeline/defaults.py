"""What the main job assumes when nothing is said: its callbacks, its epochs, and what a data module states.

:data:`DEFAULT_CALLBACKS` and :data:`DEFAULT_COMPRESS_EPOCHS` are the command line's recipe;
:class:`PipelineData` names the optional attributes :meth:`CompressTrainer.compress
<lightning_compress.pipeline.CompressTrainer.compress>` reads from a data module.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch.callbacks import Callback

__all__ = ["DEFAULT_CALLBACKS", "DEFAULT_COMPRESS_EPOCHS", "PipelineData", "default_callbacks"]


DEFAULT_CALLBACKS: tuple[dict[str, Any], ...] = (
    {"class_path": "lightning_compress.PruningCallback", "init_args": {"target_sparsity": 0.9}},
    {"class_path": "lightning_compress.SparseRegularizer", "init_args": {"strength": 1e-5}},
    {"class_path": "lightning_compress.QuantizeOnFitEnd", "init_args": {"mode": "dynamic"}},
)
"""The callbacks of the main job when none are configured: gradual magnitude pruning to 90 %, an L1
penalty that moves small weights toward zero while they are pruned, and int8 conversion at the end."""

DEFAULT_COMPRESS_EPOCHS = 30
"""Epochs of the compression fit in the command line's ``compress`` when ``--trainer.max_epochs`` is unset."""


@runtime_checkable
class PipelineData(Protocol):
    """What :meth:`CompressTrainer.compress` asks a data module beyond Lightning's own hooks.

    Every attribute is optional: a plain ``LightningDataModule`` works as it is, and the pipeline
    assumes the default where one is missing. A data module states a property by setting the
    attribute (a class attribute is enough), never by its type, so a user's own data module is
    treated like the demo's.

    Attributes:
        in_memory_data: ``True`` when the data sets are tensors already in memory, so DataLoader
            worker processes would only add start-up time; the pipeline then silences Lightning's
            "does not have many workers" warning. Default ``False``;
            :class:`~lightning_compress.demo.DigitsDataModule` sets it.

    Example:
        >>> import lightning.pytorch as pl
        >>> class Tensors(pl.LightningDataModule):
        ...     in_memory_data = True
        >>> isinstance(Tensors(), PipelineData), _in_memory_data(Tensors()), _in_memory_data(None)
        (True, True, False)
    """

    in_memory_data: bool


def _in_memory_data(datamodule: object) -> bool:
    """The data module's ``in_memory_data`` (:class:`PipelineData`), ``False`` where it says nothing."""
    return getattr(datamodule, "in_memory_data", False) is True


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def default_callbacks() -> list[Callback]:
    """New instances of :data:`DEFAULT_CALLBACKS`.

    Example:
        >>> [type(c).__name__ for c in default_callbacks()]
        ['PruningCallback', 'SparseRegularizer', 'QuantizeOnFitEnd']
    """
    return [_import(c["class_path"])(**c["init_args"]) for c in DEFAULT_CALLBACKS]
