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


def _log_start(worker_id: int) -> None:
    import os

    with open(os.environ["LC_TEST_WORKER_LOG"], "a", encoding="utf-8") as f:
        f.write(f"{worker_id}\n")


def _worker_starts(tmp_path, monkeypatch, callbacks, name):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    log = tmp_path / f"{name}.log"
    log.write_text("")
    monkeypatch.setenv("LC_TEST_WORKER_LOG", str(log))

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
            return DataLoader(data, batch_size=8, num_workers=1, worker_init_fn=_log_start, generator=g)

    trainer = quiet_trainer(
        tmp_path / name, callbacks=callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=0
    )
    trainer.fit(Classifier(backbone=MLP(hidden=(16,))), Data())
    return len(log.read_text().splitlines())


def test_the_setup_check_starts_no_loader_worker(tmp_path, monkeypatch):
    """The model-call check at setup reads its batch in this process: only the fit-end calibration adds a start."""
    plain = _worker_starts(tmp_path, monkeypatch, [], "plain")
    quantized = _worker_starts(tmp_path, monkeypatch, [QuantizeOnFitEnd(verbose=0)], "quantized")
    assert plain == 1
    assert quantized == plain + 1  # the calibration batches at fit end; none at setup
