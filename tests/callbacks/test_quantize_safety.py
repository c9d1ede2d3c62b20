"""QuantizeOnFitEnd (issue 18): a path that cannot be written is found at setup; other precisions work at fit end."""

import pytest
import torch
from helpers import quiet_trainer

from lightning_compress import CompressionConfigError, QuantizeOnFitEnd, load_compressed
from lightning_compress.core.quant.convert import int8_layers
from lightning_compress.demo import MLP, Classifier, DigitsDataModule


def _fit(tmp_path, callback, **kwargs):
    trainer = quiet_trainer(
        tmp_path, callbacks=[callback], max_epochs=1, limit_train_batches=2, limit_val_batches=1, **kwargs
    )
    model = Classifier(backbone=MLP(hidden=(16,)))
    trainer.fit(model, DigitsDataModule(batch_size=16))
    return trainer, model


def test_a_save_path_that_is_a_folder_fails_at_setup_without_writing_beside_it(tmp_path):
    (tmp_path / "out" / "models").mkdir(parents=True)
    callback = QuantizeOnFitEnd(save_path=str(tmp_path / "out" / "models"), verbose=0)
    with pytest.raises(
        CompressionConfigError,
        match=r"Expected argument `save_path` to be the path of a file that can be written, but got '.*models'\."
        r" It cannot: '.*models' is a folder\.",
    ):
        _fit(tmp_path, callback)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["models"]
    assert list((tmp_path / "out" / "models").iterdir()) == []


def test_a_save_path_under_a_file_fails_at_setup(tmp_path):
    (tmp_path / "afile").write_text("")
    callback = QuantizeOnFitEnd(save_path=str(tmp_path / "afile" / "m.pt"), verbose=0)
    with pytest.raises(CompressionConfigError, match=r"It cannot: '.*afile' is a file, not a folder\."):
        _fit(tmp_path, callback)
    assert (tmp_path / "afile").read_text() == ""


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_other_model_precisions_quantize_at_fit_end(tmp_path, precision):
    path = tmp_path / "m.pt"
    _, model = _fit(tmp_path, QuantizeOnFitEnd(save_path=str(path), verbose=0), precision=precision)
    assert set(int8_layers(model)) == {"backbone.net.1", "backbone.net.3"}
    state = model.state_dict()
    assert state["backbone.net.1.weight"].dtype == state["backbone.net.3.weight"].dtype == torch.int8
    x = torch.rand(4, 1, 8, 8, dtype=state["backbone.net.1.bias"].dtype)
    with torch.no_grad():
        assert torch.isfinite(model(x).float()).all()
    dtype = state["backbone.net.1.bias"].dtype
    assert dtype == {"64-true": torch.float64, "bf16-true": torch.bfloat16}[precision]
    fresh = load_compressed(path, Classifier(backbone=MLP(hidden=(16,))).to(dtype))  # loads in its own dtype
    assert set(int8_layers(fresh)) == set(int8_layers(model))
