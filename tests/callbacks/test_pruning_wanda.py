"""PruningCallback(score="wanda") and scope="row": statistics on the right batches, exact masks, resume."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from fixtures import TinyNet, classification_loader, mlp, sgd
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_compress import CompressionConfigError, PruningCallback
from lightning_compress.callbacks import _statistics
from lightning_compress.core.prune.masks import compute_masks


class ValidatedNet(TinyNet):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


def _net() -> TinyNet:
    torch.manual_seed(0)
    return ValidatedNet(mlp(6, 8), nn.Linear(8, 3), optimizer=sgd(0.05, momentum=0.9))


def test_bad_score_arguments_fail_in_the_constructor() -> None:
    with pytest.raises(CompressionConfigError, match=r"score.*'magnitude'.*'wanda'.*'bogus'"):
        PruningCallback(0.5, score="bogus")
    with pytest.raises(CompressionConfigError, match=r"scope.*method='channel'.*'row'"):
        PruningCallback(0.5, method="channel", scope="row")
    with pytest.raises(CompressionConfigError, match=r"score_batches"):
        PruningCallback(0.5, score="wanda", score_batches=0)
    with pytest.raises(CompressionConfigError, match=r"score.*remove_channels=True.*'wanda'"):
        PruningCallback(0.5, method="channel", remove_channels=True, score="wanda")


def _row_reference(weight: Tensor, norms: Tensor, sparsity: float) -> Tensor:
    score = weight.abs() * norms
    k = round(sparsity * weight.shape[1])
    keep = torch.ones_like(weight, dtype=torch.bool)
    order = torch.sort(score, dim=1, stable=True).indices
    keep.scatter_(1, order[:, :k], False)
    return keep


def test_constant_at_step_zero_calibrates_on_the_first_batches_without_gradients(tmp_path) -> None:
    model = _net()
    loader = classification_loader(64, 6, 3, batch_size=8)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cb = PruningCallback(0.5, schedule="constant", scope="row", score="wanda", score_batches=3, verbose=0)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[cb])
    trainer.fit(model, loader)
    # by hand: the first layer's inputs are the first 3 batches of x; the head's are the hidden activations
    xs = [x for x, _ in list(loader)[:3]]
    w0, w2 = initial["body.0.weight"], initial["head.weight"]
    n0 = sum((x**2).sum(0) for x in xs).sqrt()
    hidden = [torch.relu(x @ w0.T + initial["body.0.bias"]) for x in xs]
    n2 = sum((h**2).sum(0) for h in hidden).sqrt()
    assert torch.equal(cb.masks["body.0.weight"], _row_reference(w0, n0, 0.5))
    assert torch.equal(cb.masks["head.weight"], _row_reference(w2, n2, 0.5))
    assert (cb.masks["head.weight"].sum(1) == 4).all()
    assert set(model.state_dict()) == set(initial)  # keys unchanged


class HookSpy(Callback):
    """Counts the forward pre-hooks on the selected layers at each training batch and in validation."""

    def __init__(self) -> None:
        self.train: dict[int, int] = {}
        self.val: list[int] = []

    @staticmethod
    def _hooks(module: pl.LightningModule) -> int:
        return sum(len(m._forward_pre_hooks) for m in module.modules() if isinstance(m, nn.Linear))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self.train[trainer.global_step] = self._hooks(pl_module)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.val.append(self._hooks(pl_module))


def test_hooks_only_on_the_batches_before_an_update_and_statistics_are_theirs(tmp_path, monkeypatch) -> None:
    # 8 batches per epoch, window steps 2-10 (start_epoch 0, end_epoch 0 is 8 steps; start 2 via initial update)
    model = _net()
    loader = classification_loader(64, 6, 3, batch_size=8)
    used: list[tuple[int, Tensor]] = []
    original = _statistics.ScoreStatistics.norms

    def spy(self: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> dict[str, Tensor]:
        norms = original(self, trainer, pl_module, who)
        used.append((trainer.global_step, norms["body.0.weight"].clone()))
        return norms

    monkeypatch.setattr(_statistics.ScoreStatistics, "norms", spy)
    cb = PruningCallback(
        0.75, start_epoch=1, end_epoch=2, update_every_n_steps=4, score="wanda", score_batches=2, verbose=0
    )
    hooks = HookSpy()
    trainer = quiet_trainer(tmp_path, max_epochs=4, callbacks=[cb, hooks], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    window = cb.window
    assert window is not None and (window.start, window.end) == (8, 24)
    updates = [8, 12, 16, 20, 24]
    wanted = {g for u in updates for g in (u - 2, u - 1)}
    assert {g for g, n in hooks.train.items() if n} == wanted  # hooks on exactly these batches
    assert all(n == 2 for g, n in hooks.train.items() if g in wanted)  # one per selected layer
    assert hooks.val and not any(hooks.val)
    assert not hooks._hooks(model)
    assert [step for step, _ in used] == updates
    batches = [x for x, _ in loader]
    for step, norms in used:  # the first layer's input is the batch itself
        expected = sum((batches[g % 8] ** 2).sum(0) for g in (step - 2, step - 1)).sqrt()
        assert torch.allclose(norms, expected)


def test_scope_row_with_magnitude_prunes_every_row_to_the_target(tmp_path) -> None:
    model = _net()
    cb = PruningCallback(0.5, schedule="constant", scope="row", verbose=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[cb]).fit(
        model, classification_loader(16, 6, 3)
    )
    for name, mask in cb.masks.items():
        assert (mask.sum(1) == mask.shape[1] // 2).all(), name
        weight = dict(model.named_parameters())[name].detach()
        assert torch.equal(mask, weight != 0)


def test_wanda_with_2_4_keeps_the_two_best_by_score(tmp_path) -> None:
    model = _net()
    loader = classification_loader(32, 6, 3, batch_size=8)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cb = PruningCallback(0.5, method="2:4", schedule="constant", score="wanda", score_batches=2, verbose=0)
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[cb]).fit(model, loader)
    xs = [x for x, _ in list(loader)[:2]]
    norms = sum((x**2).sum(0) for x in xs).sqrt()
    w0 = initial["body.0.weight"]
    expected = compute_masks({"w": w0.abs() * norms}, 0.5, "2:4")["w"]  # magnitude of the score = the score
    assert torch.equal(cb.masks["body.0.weight"], expected)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resume_mid_gathering_is_bit_identical(tmp_path) -> None:
    # 8 steps per epoch, updates at 0, 3, 6, 9, 12, 15, 16; score_batches=2: batches 7 and 8 gather for
    # step 9, so the checkpoint after epoch 0 (step 8) holds the partial sums of batch 7.
    def run(root, max_epochs: int, ckpt: Any = None, save: bool = False) -> tuple[TinyNet, PruningCallback]:
        model = _net()
        cb = PruningCallback(
            0.8, scope="layer", end_epoch=1, update_every_n_steps=3, score="wanda", score_batches=2, verbose=0
        )
        callbacks: list[Callback] = [cb]
        if save:
            callbacks.append(
                ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
            )
        trainer = quiet_trainer(root, max_epochs=max_epochs, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(model, classification_loader(64, 6, 3, batch_size=8), ckpt_path=ckpt)
        return model, cb

    full_model, full = run(tmp_path / "full", 3, save=True)
    checkpoint = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"][full.state_key]
    sums = state["statistics"]["sums"]
    assert set(sums) == {"body.0.weight", "head.weight"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in sums.values())
    assert state["statistics"]["calls"] == {"body.0.weight": 1, "head.weight": 1}
    torch.manual_seed(123)
    resumed_model, resumed = run(tmp_path / "resumed", 3, ckpt=checkpoint)
    for name, mask in full.masks.items():
        assert torch.equal(mask, resumed.masks[name]), name
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
