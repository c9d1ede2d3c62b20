"""QuantizeOnFitEnd(onnx_path=...): the int8 model is written as ONNX at fit end, bad paths refused before."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import quiet_trainer
from onnx_helpers import rel_err, run_onnx

from lightning_compress import CompressionConfigError, QuantizeOnFitEnd
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.demo import Classifier


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fit_writes_the_onnx_model(tmp_path, digits, mode: str) -> None:
    path = tmp_path / "out" / "model.onnx"
    model = Classifier()
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        callbacks=[QuantizeOnFitEnd(mode=mode, calibration_batches=2, onnx_path=str(path), verbose=0)],
    )
    trainer.fit(model, datamodule=digits)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.rand(11, 1, 8, 8)
    (got,) = run_onnx(path, x)
    with torch.no_grad():
        want = model.eval()(x)
    assert got.shape == (11, 10)
    assert rel_err(got, want) <= 0.02
    assert np.mean(got.argmax(1) == want.argmax(1).numpy()) >= 10 / 11


def test_bad_onnx_path_is_refused_before_training(tmp_path, digits) -> None:
    with pytest.raises(CompressionConfigError, match="Expected argument `onnx_path` to be a non-empty path"):
        QuantizeOnFitEnd(onnx_path="")
    with pytest.raises(CompressionConfigError, match="Expected argument `onnx_path` to be a non-empty path"):
        QuantizeOnFitEnd(onnx_path=3)  # type: ignore[arg-type]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for bad, match in [(tmp_path, "not a folder|is a folder"), (afile / "m.onnx", "is a file, not a folder")]:
        model = Classifier()
        trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[QuantizeOnFitEnd(onnx_path=str(bad), verbose=0)])
        before = model.backbone.net[1].weight.detach().clone()
        with pytest.raises(CompressionConfigError, match=match):
            trainer.fit(model, datamodule=digits)
        assert torch.equal(model.backbone.net[1].weight, before)  # nothing trained


def test_missing_extra_is_refused_at_setup(tmp_path, digits, monkeypatch) -> None:
    import lightning_compress.export._deps as deps

    monkeypatch.setattr(deps, "available", lambda name: name != "onnxscript")
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, callbacks=[QuantizeOnFitEnd(onnx_path=str(tmp_path / "m.onnx"), verbose=0)]
    )
    with pytest.raises(
        CompressionConfigError, match=r'onnxscript are installed \(pip install "lightning-compress\[export\]"'
    ):
        trainer.fit(Classifier(), datamodule=digits)
