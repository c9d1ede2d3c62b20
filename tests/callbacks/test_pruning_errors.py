"""Every CompressionConfigError of PruningCallback, each raised before any training step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, classification_loader, sgd
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_compress import CompressionConfigError, PruningCallback


def Net() -> TinyNet:
    return TinyNet(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16)), nn.Linear(16, 4), optimizer=sgd(0.1))


def _loader() -> DataLoader:
    return classification_loader(40, 8, 4, seed=None)


def _fit_raises(tmp_path, callback: PruningCallback, match: str, loader: Any = None, **trainer_kwargs: Any) -> None:
    model = Net()
    trainer_kwargs.setdefault("max_epochs", 3)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], **trainer_kwargs)
    with pytest.raises(CompressionConfigError, match=match):
        trainer.fit(model, loader if loader is not None else _loader())
    assert model.steps_run == 0, "the error came after training started"
    assert not model.head.weight.eq(0).any(), "weights were pruned before the error"


# ------------------------------------------------------------------ constructor


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_target_outside_0_1(target: float) -> None:
    with pytest.raises(CompressionConfigError, match=r"Expected argument `target_sparsity` to be a number in \[0, 1\)"):
        PruningCallback(target)


def test_target_not_a_number() -> None:
    with pytest.raises(
        CompressionConfigError, match=r"Expected argument `target_sparsity` to be a number, but got '0\.5'"
    ):
        PruningCallback("0.5")  # type: ignore[arg-type]


def test_initial_above_target() -> None:
    with pytest.raises(
        CompressionConfigError,
        match=r"Expected argument `initial_sparsity` to be at most target_sparsity=0\.5, but got 0\.6",
    ):
        PruningCallback(0.5, initial_sparsity=0.6)


def test_initial_outside_0_1() -> None:
    with pytest.raises(CompressionConfigError, match=r"`initial_sparsity` to be a number in \[0, 1\), but got -0.1"):
        PruningCallback(0.5, initial_sparsity=-0.1)


def test_unknown_method() -> None:
    with pytest.raises(
        CompressionConfigError,
        match="Expected argument `method` to be one of 'magnitude', 'channel' or 'N:M' such as '2:4', but got 'l1'",
    ):
        PruningCallback(0.5, method="l1")


def test_a_registered_pattern_is_accepted_and_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_compress.core.prune import patterns

    monkeypatch.setattr(patterns, "_PATTERNS", dict(patterns._PATTERNS))  # the entry leaves with the test
    patterns.register_pattern("test_rows", lambda scores, sparsity, scope, previous: {})
    assert PruningCallback(0.5, method="test_rows").method == "test_rows"
    with pytest.raises(CompressionConfigError, match="one of 'magnitude', 'channel', 'test_rows' or 'N:M' such as"):
        PruningCallback(0.5, method="l1")


@pytest.mark.parametrize("method", ["4:2", "4:4", "0:4"])
def test_nm_needs_n_below_m(method: str) -> None:
    with pytest.raises(
        CompressionConfigError, match=f"`method` to be an N:M pattern with 0 < N < M such as '2:4', but got '{method}'"
    ):
        PruningCallback(0.5, method=method)


def test_nm_with_a_target_it_cannot_mean() -> None:
    with pytest.raises(
        CompressionConfigError,
        match=r"`target_sparsity` to be 0.5 for method '2:4', but got 0.8. An N:M pattern keeps 2 of every 4 weights",
    ):
        PruningCallback(0.8, method="2:4")
    PruningCallback(0.5, method="2:4")  # the one target it can mean
    PruningCallback(2 / 3, method="1:3")


def test_unknown_scope() -> None:
    with pytest.raises(
        CompressionConfigError, match="`scope` to be one of 'global', 'layer' or 'row', but got 'model'"
    ):
        PruningCallback(0.5, scope="model")


def test_unknown_schedule() -> None:
    with pytest.raises(
        CompressionConfigError, match="`schedule` to be one of 'cubic', 'linear' or 'constant', but got 'exponential'"
    ):
        PruningCallback(0.5, schedule="exponential")


def test_end_epoch_before_start_epoch() -> None:
    with pytest.raises(
        CompressionConfigError, match="Expected argument `end_epoch` to be None or an epoch >= start_epoch=3, but got 2"
    ):
        PruningCallback(0.5, start_epoch=3, end_epoch=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start_epoch=-1), r"`start_epoch` to be an integer in \[0, inf\), but got -1"),
        (dict(end_epoch=1.5), "`end_epoch` to be an integer, but got 1.5"),
        (dict(update_every_n_steps=0), r"`update_every_n_steps` to be an integer in \[1, inf\), but got 0"),
        (dict(verbose=3), r"`verbose` to be an integer in \[0, 2\], but got 3"),
        (dict(include="Linear"), "`include` to be a list of strings, but got 'Linear'"),
        (dict(exclude=[1]), r"`exclude` to be a list of strings, but got \[1\]"),
    ],
)
def test_other_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(CompressionConfigError, match=match):
        PruningCallback(0.5, **kwargs)


# ------------------------------------------------------------------ setup, before training


def test_end_epoch_past_max_epochs(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, end_epoch=3),
        r"`end_epoch` to be None or an epoch before max_epochs=3 \(epochs count from 0\), but got 3. The target",
    )


def test_start_epoch_past_max_epochs(tmp_path) -> None:
    _fit_raises(tmp_path, PruningCallback(0.5, start_epoch=3), "`start_epoch` to be an epoch before max_epochs=3")


def test_include_that_selects_nothing_lists_the_module_types(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, include=["Conv2d"]),
        r"selected none. The model has these module types with a weight: \['LayerNorm', 'Linear'\]",
    )


def test_exclude_that_leaves_nothing(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, exclude=["body.*", "head"]),
        r"`include`=\['Linear', 'Conv1d', 'Conv2d', 'Conv3d'\] and `exclude`=\['body.\*', 'head'\] to select at least",
    )


def test_no_end_of_training_known(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5),
        "`end_epoch` to be an epoch when the Trainer has neither max_epochs nor max_steps, but got None",
        max_epochs=-1,
    )


def test_end_epoch_past_max_steps(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, end_epoch=2),
        r"`end_epoch` to be an epoch that ends by max_steps=12 \(5 optimizer steps per epoch\), but got 2",
        max_steps=12,
    )


def test_start_epoch_past_max_steps(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, start_epoch=3),
        "`start_epoch` to be an epoch that starts before max_steps=12",
        max_epochs=None,
        max_steps=12,
    )


class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            yield torch.randn(8, generator=g), torch.randint(0, 4, (), generator=g)


def test_data_without_length_needs_max_steps(tmp_path) -> None:
    _fit_raises(
        tmp_path,
        PruningCallback(0.5, end_epoch=1),
        "Expected `start_epoch=0`, `end_epoch=None` and a Trainer with `max_steps` when the training data has no"
        " length",
        loader=DataLoader(Stream(), batch_size=8),
    )


def test_data_without_length_and_max_steps_works(tmp_path) -> None:
    callback = PruningCallback(0.5, verbose=0)
    quiet_trainer(tmp_path, max_steps=8, callbacks=[callback]).fit(Net(), DataLoader(Stream(), batch_size=8))
    assert callback.window is not None and (callback.window.start, callback.window.end) == (0, 4)
    assert callback.sparsity == pytest.approx(0.5, abs=1e-2)


def test_two_callbacks_on_the_same_weights(tmp_path) -> None:
    model = Net()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[PruningCallback(0.5), PruningCallback(0.5, method="channel")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        CompressionConfigError, match=r"to select disjoint weights, but two of them both select \['body"
    ):
        trainer.fit(model, _loader())
    assert model.steps_run == 0


# ------------------------------------------------------------------ checkpoint state


def test_unknown_state_version() -> None:
    with pytest.raises(
        CompressionConfigError, match="Expected a PruningCallback state of version 1, but got version 7"
    ):
        PruningCallback(0.5).load_state_dict({"version": 7, "masks": {}})


def test_resuming_with_masks_for_other_weights(tmp_path) -> None:
    callback = PruningCallback(0.5)
    model = Net()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # The hooks trainer.fit(ckpt_path=...) calls, in its order: setup, load_state_dict, on_fit_start.
    callback.setup(trainer, model, "fit")
    masks = {"other.weight": torch.ones(2, 2, dtype=torch.bool)}
    callback.load_state_dict({"version": 1, "masks": masks, "last_update": 0, "scheduled_sparsity": 0.0})
    with pytest.raises(CompressionConfigError, match=r"to hold masks for the weights this callback selects"):
        callback.on_fit_start(trainer, model)
