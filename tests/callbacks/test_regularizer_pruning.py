"""SparseRegularizer and PruningCallback in one Trainer: regularize, then prune."""

from __future__ import annotations

import pytest
from fixtures import TinyNet, adam, classification_loader, mlp
from helpers import quiet_trainer
from torch import nn

from lightning_compress import PruningCallback, SparseRegularizer


def Net() -> TinyNet:
    return TinyNet(mlp(8, 32, 32), nn.Linear(32, 3), optimizer=adam(1e-2))


def _fit(model, callbacks, tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=4, accelerator="cpu", callbacks=callbacks)
    trainer.fit(model, classification_loader(64, 8, 3))
    return trainer


def _adam_state_at_pruned(trainer, model, masks):
    optimizer = trainer.optimizers[0]
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        state = optimizer.state[named[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            yield name, key, state[key][~mask]


@pytest.mark.parametrize("regularizer_first", [True, False])
@pytest.mark.parametrize(
    ("penalty", "proximal", "method"),
    [("l1", False, "magnitude"), ("l1", True, "magnitude"), ("group_lasso", False, "channel")],
)
def test_regularize_then_prune_in_one_trainer(tmp_path, penalty, proximal, method, regularizer_first):
    regularizer = SparseRegularizer(0.01, penalty=penalty, proximal=proximal, verbose=0)
    pruning = PruningCallback(
        0.75, method=method, start_epoch=2, end_epoch=2, update_every_n_steps=2, exclude=["head"], verbose=0
    )
    callbacks = [regularizer, pruning] if regularizer_first else [pruning, regularizer]
    model = Net()
    trainer = _fit(model, callbacks, tmp_path)

    masks = dict(pruning.masks)
    assert set(masks) == {"body.0.weight", "body.2.weight"}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert 1 - kept / total == pytest.approx(0.75, abs=0.02)
    named = dict(model.named_parameters())
    for name, mask in masks.items():
        weight = named[name].detach()
        assert (weight[~mask] == 0).all(), name  # the penalty does not regrow pruned weights
        if method == "channel":
            assert ((weight == 0).all(dim=1) == ~mask.all(dim=1)).all()
    # The penalty's (sub)gradient at an exact zero is zero, so it leaves no optimizer state there.
    for name, key, values in _adam_state_at_pruned(trainer, model, masks):
        assert (values == 0).all(), (name, key)
    # The regularizer acted on every optimizer step alongside pruning.
    assert regularizer.state_dict()["steps"] == 4 * 8
    assert trainer.callback_metrics["sparse_reg/penalty"] > 0
