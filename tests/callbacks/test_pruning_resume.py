"""PruningCallback across fits: exact resume from checkpoints, and reuse without stale state or leaks."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor

from lightning_compress import PruningCallback
from lightning_compress.demo import MLP, Classifier, DigitsDataModule


def _trainer(root, callbacks: list[Callback], max_epochs: int, checkpoints: bool = False) -> pl.Trainer:
    return quiet_trainer(
        root,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_checkpointing=checkpoints,
        limit_train_batches=8,
        limit_val_batches=0,
    )


def _pruning(update_every: int) -> PruningCallback:
    return PruningCallback(0.8, end_epoch=1, update_every_n_steps=update_every, verbose=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize("update_every", [3, 8], ids=["update-mid-epoch", "update-at-the-checkpoint"])
def test_resume_mid_schedule_is_bit_identical(tmp_path, update_every: int) -> None:
    # 8 steps per epoch, window steps 0-16. The checkpoint after epoch 0 (step 8) is mid-window:
    # with update_every=3 the last update was at step 6, with 8 it was at step 8 itself.
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(48, 24)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = _pruning(update_every)
    _trainer(tmp_path / "full", [full, saver], max_epochs=3, checkpoints=True).fit(model, DigitsDataModule())
    checkpoint = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"][full.state_key]
    assert state["version"] == 1
    assert state["last_update"] == (6 if update_every == 3 else 8)
    assert 0.0 < state["scheduled_sparsity"] < 0.8  # mid-schedule
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in state["masks"].values())
    assert set(state["masks"]) == {"backbone.net.1.weight", "backbone.net.3.weight", "backbone.net.5.weight"}

    torch.manual_seed(123)  # the resumed run must not depend on the global random state
    resumed_model = Classifier(MLP(hidden=(48, 24)))
    resumed_model.load_state_dict(initial)
    resumed = _pruning(update_every)
    _trainer(tmp_path / "resumed", [resumed], max_epochs=3).fit(resumed_model, DigitsDataModule(), ckpt_path=checkpoint)
    final, again = model.state_dict(), resumed_model.state_dict()
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key
    assert resumed.masks.keys() == full.masks.keys()
    assert all(torch.equal(resumed.masks[k], full.masks[k]) for k in full.masks)
    assert resumed.scheduled_sparsity == full.scheduled_sparsity == 0.8
    assert resumed.sparsity == full.sparsity == pytest.approx(0.8, abs=1e-4)


class _Capture(Callback):
    """Keeps weak references to the optimizers of a fit."""

    def __init__(self) -> None:
        self.optimizers: list[weakref.ref[torch.optim.Optimizer]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.optimizers = [weakref.ref(o) for o in trainer.optimizers]


class _Watch(Callback):
    """Records, at every batch of epoch 0, the pruning masks and the model's zero count."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            zeros = sum(int((p == 0).sum()) for n, p in pl_module.named_parameters() if n.endswith("weight"))
            self.seen.append((len(self.pruning.masks), zeros))


def _tensors_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor))


def test_reuse_starts_clean_and_keeps_no_reference_to_old_models(tmp_path) -> None:
    pruning = PruningCallback(0.5, schedule="constant", start_epoch=1, verbose=0)
    data = DigitsDataModule()
    refs: list[weakref.ref[Any]] = []
    alive: list[int] = []
    shapes = []
    for i, hidden in enumerate([(40,), (24, 16), (40,)]):
        model = Classifier(MLP(hidden=hidden))
        watch, capture = _Watch(pruning), _Capture()
        trainer = _trainer(tmp_path / str(i), [pruning, watch, capture], max_epochs=2)
        trainer.fit(model, data)
        assert watch.seen and all(seen == (0, 0) for seen in watch.seen), "stale masks before start_epoch"
        optimizer = capture.optimizers[0]()
        assert optimizer is not None and not optimizer._optimizer_step_post_hooks  # hooks removed at teardown
        shapes.append({k: tuple(v.shape) for k, v in pruning.masks.items()})
        assert shapes[-1] == {k: tuple(v.shape) for k, v in model.named_parameters() if k.endswith("weight")}
        refs += [weakref.ref(model), capture.optimizers[0]]
        del model, trainer, optimizer, watch, capture
        if i in (0, 2):
            alive.append(_tensors_alive())
    assert shapes[0] != shapes[1]
    assert all(ref() is None for ref in refs[:-2]), "an old model or optimizer is still referenced"
    # No growth: fits 0 and 2 train the same architecture and leave the same number of live tensors.
    assert alive[1] == alive[0]


def test_exception_mid_fit_releases_the_optimizer_hooks(tmp_path) -> None:
    class Boom(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if self.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    pruning = PruningCallback(0.5, schedule="constant", verbose=0)
    capture = _Capture()
    model = Boom(MLP(hidden=(16,)))
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [pruning, capture], max_epochs=1).fit(model, DigitsDataModule())
    optimizer = capture.optimizers[0]()
    assert optimizer is not None and not optimizer._optimizer_step_post_hooks
    assert pruning.sparsity == pytest.approx(0.5, abs=1e-3) and len(pruning.masks) == 2
