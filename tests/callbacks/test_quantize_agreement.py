"""QuantizeOnFitEnd warns when the int8 model agrees poorly with the float one, naming the worst layers."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import QuantizeOnFitEnd
from lightning_compress.core.quant.agreement import AGREEMENT_RELATIVE_ERROR, is_poor, layer_errors


class Net(pl.LightningModule):
    def __init__(self, outlier: float):
        super().__init__()
        self.good = nn.Linear(16, 32)
        self.bad = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            # One huge entry on an input that is always zero (relu of -1): it changes no output, but a
            # per-tensor scale set by it rounds every other weight of the layer to a few levels.
            self.good.weight[0] = 0.0
            self.good.bias[0] = -1.0
            self.bad.weight[0, 0] = outlier

    def forward(self, x):
        return self.head(torch.relu(self.bad(torch.relu(self.good(x)))))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)), 16)


def test_poor_agreement_warns_with_the_worst_layer_and_the_remedy(tmp_path):
    cb = QuantizeOnFitEnd(per_channel=False, calibration_batches=2, verbose=0)
    poor = r"agrees poorly.*relative output error .* > 0.05.*largest own int8 error"
    with pytest.warns(UserWarning, match=poor) as rec:
        quiet_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Net(outlier=50.0), _loader())
    message = next(str(w.message) for w in rec if "agrees poorly" in str(w.message))
    assert "exclude=['bad']" in message and "per_channel=True" in message and "qat_epochs" in message
    worst = cb.report["worst_layers"]
    assert next(iter(worst)) == "bad" and worst["bad"] > 10 * worst["good"]
    assert cb.report["relative_error"] > AGREEMENT_RELATIVE_ERROR


def test_under_qat_the_warning_names_the_fake_quantized_reference_and_no_qat_remedy(tmp_path, monkeypatch):
    import lightning_compress.callbacks.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "is_poor", lambda *_: True)  # as if QAT's int8 model agreed poorly
    cb = QuantizeOnFitEnd("static", calibration_batches=2, qat_epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="agrees poorly with the fake-quantized model that QAT trained") as rec:
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[cb]).fit(Net(outlier=0.1), _loader())
    message = next(str(w.message) for w in rec if "agrees poorly" in str(w.message))
    assert "float one" not in message and "qat_epochs" not in message and "weight_only" in message


def test_good_agreement_stays_quiet(tmp_path):
    cb = QuantizeOnFitEnd(calibration_batches=2, verbose=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*agrees poorly.*")
        quiet_trainer(tmp_path, max_steps=1, callbacks=[cb]).fit(Net(outlier=0.1), _loader())
    assert cb.report["worst_layers"] == {} and not is_poor(cb.report["relative_error"], cb.report["top1_agreement"])


def test_layer_errors_compare_each_layer_with_its_float_original_on_the_same_input():
    from lightning_compress.core.quant.modules import Int8Linear

    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    with torch.no_grad():
        b.weight[0, 0] = 500.0
    model = nn.Sequential(Int8Linear.from_float(a), Int8Linear.from_float(b, per_channel=False))
    x = torch.randn(4, 8)
    errors = layer_errors(model, {"0": a, "1": b}, lambda: model(x))
    assert list(errors) == ["1", "0"]  # largest first
    with torch.no_grad():
        inner = model[0](x)
        want = float((model[1](inner) - b(inner)).norm() / b(inner).norm())
    assert errors["1"] == pytest.approx(want, rel=1e-5)
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
