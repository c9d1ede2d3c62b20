"""An ``exclude`` glob that matches no module is an error in every callback and in ``sparse_penalty`` (issue 18)."""

import pytest
from helpers import quiet_trainer

from lightning_compress import (
    CompressionConfigError,
    PruningCallback,
    QuantizeOnFitEnd,
    SparseRegularizer,
    sparse_penalty,
)
from lightning_compress.demo import MLP, Classifier, DigitsDataModule

TYPO = r"every glob of argument `exclude` to match a module name, but 'backbone.nett.3' matches none\."
CLOSE = r" The closest module names: \['backbone.net.3'"


@pytest.mark.parametrize(
    "callback",
    [
        lambda: PruningCallback(0.5, exclude=["backbone.nett.3"], verbose=0),
        lambda: SparseRegularizer(1e-4, exclude=["backbone.nett.3"], verbose=0),
        lambda: QuantizeOnFitEnd(exclude=["backbone.nett.3"], verbose=0),
    ],
    ids=["PruningCallback", "SparseRegularizer", "QuantizeOnFitEnd"],
)
def test_a_typo_in_exclude_fails_at_setup_with_close_names(tmp_path, callback):
    model = Classifier(backbone=MLP(hidden=(16,)))
    trainer = quiet_trainer(tmp_path, callbacks=[callback()], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(CompressionConfigError, match=TYPO + CLOSE):
        trainer.fit(model, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0


def test_a_typo_in_exclude_fails_in_sparse_penalty():
    with pytest.raises(
        CompressionConfigError, match=r"but 'nett.3' matches none\. The closest module names: \['net.3'"
    ):
        sparse_penalty(MLP(hidden=(16,)), exclude=["nett.3"])
