"""Every use of a private Lightning attribute, in one place.

Lightning gives no public way to do these four things; each function here wraps one private
attribute, and ``tests/test_lightning_compat.py`` fails loudly (naming the attribute) the day a
Lightning release moves it, instead of the callbacks breaking in a user's run.

* :func:`unwrap_optimizer`: ``LightningOptimizer._optimizer``, the ``torch.optim.Optimizer`` that
  ``on_before_optimizer_step`` receives wrapped (its ``state`` is what pruning masks).
* :func:`data_source`: ``trainer.<loop>._data_source``, to learn at ``setup`` whether a stage has a
  dataloader, and to take a probe batch from it, before the loop itself asks for it.
* :func:`given_by_cli`: ``hparams_mixin._given_hyperparameters``, set while LightningCLI
  instantiates a module (it then saves the config itself).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

__all__ = ["data_source", "given_by_cli", "loader_at_setup", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The ``torch.optim.Optimizer`` inside a ``LightningOptimizer`` (or the optimizer itself)."""
    inner: Optimizer = getattr(optimizer, "_optimizer", optimizer)
    return inner


def data_source(trainer: pl.Trainer, stage: str) -> Any | None:
    """The ``_DataConnector`` source of the loop that runs ``stage`` (``None`` if there is none).

    It has ``is_defined()``, ``instance`` and ``dataloader()``.
    """
    loop = {"fit": trainer.fit_loop, "validate": trainer.validate_loop, "test": trainer.test_loop}.get(stage)
    return getattr(loop, "_data_source", None)


def loader_at_setup(trainer: pl.Trainer, stage: str) -> Any | None:
    """The ``stage`` dataloader(s) as the loop will get them, built at a callback's ``setup``; ``None`` when unsafe.

    Lightning runs ``LightningDataModule.setup`` before the callbacks' ``setup`` and the
    ``LightningModule``'s own ``setup`` after them. Loaders passed to ``fit`` and a data module's
    loaders can therefore be built now; a loader from the ``LightningModule``'s own
    ``train_dataloader`` hook may need that module's ``setup`` and is left for the loop (``None``).
    """
    source = data_source(trainer, stage)
    if source is None or not source.is_defined() or isinstance(source.instance, pl.LightningModule):
        return None
    return source.dataloader()


def given_by_cli() -> bool:
    """Whether LightningCLI is instantiating a module right now (it then saves the config as hyperparameters)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - a Lightning without the hook
        return False
    return _given_hyperparameters.get() is not None
