"""A NaN or infinite weight at a mask update is a clear error naming the layer (issue 18)."""

import pytest
import torch
from helpers import quiet_trainer

from lightning_compress import PruningCallback
from lightning_compress.demo import MLP, Classifier, DigitsDataModule


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_at_a_mask_update_names_the_layer(tmp_path, bad):
    model = Classifier(backbone=MLP(hidden=(16,)))
    with torch.no_grad():
        model.backbone.net[3].weight[0, 0] = bad
    callback = PruningCallback(0.5, schedule="constant", update_every_n_steps=1, verbose=0)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    with pytest.raises(
        FloatingPointError,
        match=r"PruningCallback: the weight `backbone.net.3.weight` holds NaN or infinite values at the mask update"
        r" of step \d+, so its magnitudes cannot be ranked",
    ):
        trainer.fit(model, DigitsDataModule(batch_size=16))


def test_finite_weights_prune_as_before(tmp_path):
    model = Classifier(backbone=MLP(hidden=(16,)))
    callback = PruningCallback(0.5, schedule="constant", update_every_n_steps=1, verbose=0)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    weights = torch.cat([model.backbone.net[i].weight.reshape(-1) for i in (1, 3)])
    assert int((weights == 0).sum()) == weights.numel() // 2
