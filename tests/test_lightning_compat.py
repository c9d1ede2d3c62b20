"""Every private Lightning attribute the package uses still exists and means what we think.

When one of these fails after a Lightning upgrade, `lightning_compress/_lightning_compat.py` is the one
place to mend.
"""

from __future__ import annotations

import torch
from helpers import quiet_trainer
from lightning.pytorch.core.optimizer import LightningOptimizer

from lightning_compress._lightning_compat import data_source, given_by_cli, loader_at_setup, unwrap_optimizer
from lightning_compress.demo import Classifier, DigitsDataModule


def test_lightning_optimizer_still_wraps_the_torch_optimizer_as_underscore_optimizer() -> None:
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    wrapped = LightningOptimizer(inner)
    assert hasattr(wrapped, "_optimizer"), "LightningOptimizer no longer has `_optimizer`"
    assert unwrap_optimizer(wrapped) is inner
    assert unwrap_optimizer(inner) is inner


def test_loops_still_have_a_data_source_that_knows_whether_it_is_defined(tmp_path) -> None:
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    for stage in ("fit", "validate", "test"):
        source = data_source(trainer, stage)
        assert source is not None, f"trainer's {stage} loop no longer has `_data_source`"
        assert callable(source.is_defined) and callable(source.dataloader) and hasattr(source, "instance")
    seen = {}

    class Probe(Classifier):
        def on_fit_start(self) -> None:
            source = data_source(self.trainer, "fit")
            seen["defined"] = source.is_defined()
            seen["loader"] = source.dataloader()

    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(Probe(), DigitsDataModule(batch_size=8))
    assert seen["defined"] is True and len(next(iter(seen["loader"]))) == 2
    assert data_source(trainer, "predict") is None


def test_loader_at_setup_builds_a_data_modules_loader_and_leaves_the_modules_own_hook(tmp_path) -> None:
    seen = {}

    class Probe(Classifier):
        def setup(self, stage: str) -> None:
            seen[stage] = loader_at_setup(self.trainer, "fit")

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
            return torch.utils.data.DataLoader(data, batch_size=2)

    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(Probe(), DigitsDataModule(batch_size=8))  # the data module's loader: built now
    assert len(next(iter(seen["fit"]))[0]) == 8
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(Probe())  # the module's own hook: left to the loop
    assert seen["fit"] is None


def test_given_hyperparameters_is_set_while_lightning_cli_instantiates() -> None:
    from lightning.pytorch.core.mixins import hparams_mixin

    assert hasattr(hparams_mixin, "_given_hyperparameters"), "hparams_mixin no longer has `_given_hyperparameters`"
    assert given_by_cli() is False
    token = hparams_mixin._given_hyperparameters.set({"x": 1})
    try:
        assert given_by_cli() is True
    finally:
        hparams_mixin._given_hyperparameters.reset(token)
