"""The callbacks' common base: one versioned-state policy, one `verbose` check, argument changes on resume."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import quiet_trainer
from lightning.fabric.utilities.warnings import PossibleUserWarning

from lightning_compress import CompressionConfigError, PruningCallback, QuantizeOnFitEnd, SparseRegularizer
from lightning_compress.callbacks._base import CompressionCallback
from lightning_compress.demo import Classifier, DigitsDataModule

CALLBACKS = [
    lambda: PruningCallback(0.5, verbose=0),
    lambda: SparseRegularizer(1e-4, verbose=0),
    lambda: QuantizeOnFitEnd(verbose=0),
]


@pytest.mark.parametrize("make", CALLBACKS)
def test_every_callback_is_a_compression_callback_with_one_version_policy(make) -> None:
    callback = make()
    assert isinstance(callback, CompressionCallback)
    state = callback.state_dict()
    assert state["version"] == 1 and isinstance(state["arguments"], dict)
    name = type(callback).__name__
    for bad in (0, 2, None, "1"):
        with pytest.raises(CompressionConfigError, match=f"Expected a {name} state of version 1, but got version"):
            make().load_state_dict({**state, "version": bad})
    with pytest.raises(CompressionConfigError, match=f"Expected the {name} state in the checkpoint to be a dict"):
        make().load_state_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("make", CALLBACKS)
@pytest.mark.parametrize("verbose", [True, 1.0, -1, 3, "1"])
def test_one_verbose_check(make, verbose) -> None:
    cls = type(make())
    with pytest.raises(CompressionConfigError, match=r"Expected argument `verbose` to be an integer in \[0, [12]\]"):
        cls(**({"target_sparsity": 0.5} if cls is PruningCallback else {}), verbose=verbose)


def test_pruning_warns_once_about_every_changed_argument_on_resume() -> None:
    state = PruningCallback(0.5, method="channel", schedule="linear", verbose=0).state_dict()
    other = PruningCallback(0.5, method="channel", schedule="cubic", start_epoch=1, verbose=0)
    with pytest.warns(UserWarning) as record:
        other.load_state_dict(state)
    (message,) = [str(w.message) for w in record if "resuming" in str(w.message)]
    assert message == (
        "PruningCallback: resuming with different arguments: schedule='cubic' (checkpoint: 'linear'),"
        " start_epoch=1 (checkpoint: 0)."
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruningCallback(0.5, method="channel", schedule="linear", verbose=0).load_state_dict(state)  # same: silent


def test_state_of_release_0_1_is_read(tmp_path) -> None:
    """0.1 wrote no `arguments` entry but kept `method` / `target_sparsity` at the top level."""
    old = {"version": 1, "last_update": 3, "scheduled_sparsity": 0.25, "masks": {}, "method": "magnitude"}
    old["target_sparsity"] = 0.9
    callback = PruningCallback(0.5, verbose=0)
    with pytest.warns(UserWarning, match=r"target_sparsity=0.5 \(checkpoint: 0.9\)"):
        callback.load_state_dict(old)


def test_regularizer_warning_filter_lives_for_the_fit_only(tmp_path, monkeypatch) -> None:
    before = list(warnings.filters)
    regularizer = SparseRegularizer(1e-4, verbose=0)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    monkeypatch.setattr(type(trainer), "world_size", property(lambda self: 2))  # as under DDP, without processes
    try:
        regularizer.setup(trainer, Classifier(), "fit")
        added = [f for f in warnings.filters if f not in before]
        assert len(added) == 2 and all(f[0] == "ignore" and f[2] is PossibleUserWarning for f in added)
    finally:
        regularizer.teardown(trainer, Classifier(), "fit")
    assert list(warnings.filters) == before


def test_callbacks_release_the_model_after_fit(tmp_path) -> None:
    pruning, regularizer = PruningCallback(0.5, verbose=0), SparseRegularizer(1e-4, proximal=True, verbose=0)
    model = Classifier()
    trainer = quiet_trainer(
        tmp_path, callbacks=[pruning, regularizer], max_epochs=1, limit_train_batches=2, limit_val_batches=0
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert pruning._keeper is None and regularizer._targets == [] and regularizer._handles == []
    assert torch.is_tensor(next(iter(model.parameters())))


def test_a_fit_refused_at_setup_leaves_no_empty_logger_folder(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="logs")
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=[PruningCallback(0.5, start_epoch=3)], max_epochs=2)
    with pytest.raises(CompressionConfigError, match="start_epoch"):
        trainer.fit(Classifier(), DigitsDataModule(batch_size=32))
    assert not (tmp_path / "logs" / "version_0").exists()
    # A folder that holds anything is never removed.
    kept = tmp_path / "logs" / "version_0"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = quiet_trainer(tmp_path, logger=logger, callbacks=[PruningCallback(0.5, start_epoch=3)], max_epochs=2)
    with pytest.raises(CompressionConfigError):
        trainer.fit(Classifier(), DigitsDataModule(batch_size=32))
    assert (kept / "notes.txt").read_text() == "mine"
