"""QuantizeOnFitEnd: arguments, conversion at fit end, report, logging, artifacts, evaluation after fit."""

from __future__ import annotations

import csv
import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionConfigError, QuantizeOnFitEnd, load_compressed
from lightning_compress.core.quant.convert import int8_layers, record_input_ranges
from lightning_compress.core.quant.modules import Int8Conv2d, Int8Linear
from lightning_compress.demo import MLP, Classifier, SmallCNN

BATCHES = 6

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def _data(n=8 * BATCHES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _loader():
    return DataLoader(_data(), batch_size=8)


def _trainer(tmp_path, callbacks, **kwargs):
    options = {"max_epochs": 2, "accelerator": "cpu", "callbacks": callbacks, "num_sanity_val_steps": 2, **kwargs}
    return quiet_trainer(tmp_path, **options)


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"mode": "int4"},
            r"Expected argument `mode` to be one of 'dynamic', 'static' or 'weight_only', but got 'int4'",
        ),
        ({"calibration_batches": 0}, r"Expected argument `calibration_batches` to be an integer in \[1, inf\)"),
        ({"calibration_batches": 2.5}, r"Expected argument `calibration_batches` to be an integer, but got 2.5"),
        ({"per_channel": "yes"}, r"Expected argument `per_channel` to be a bool, but got 'yes'"),
        ({"include": "Linear"}, r"Expected argument `include` to be a list of strings"),
        ({"exclude": [1]}, r"Expected argument `exclude` to be a list of strings"),
        ({"save_path": ""}, r"Expected argument `save_path` to be a non-empty path string or None"),
        ({"verbose": -1}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got -1"),
        ({"verbose": 5}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got 5"),
        ({"verbose": 1.0}, r"Expected argument `verbose` to be an integer in \[0, 1\], but got 1.0"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(kwargs, match):
    with pytest.raises(CompressionConfigError, match=match):
        QuantizeOnFitEnd(**kwargs)


def test_nothing_selected_fails_before_training(tmp_path):
    model = Classifier(MLP())
    trainer = _trainer(tmp_path, [QuantizeOnFitEnd(include=["Conv2d"])])
    with pytest.raises(CompressionConfigError, match=r"selected none.*module types with a weight: \['Linear'\]"):
        trainer.fit(model, _loader())
    assert trainer.global_step == 0


def test_a_type_without_int8_version_fails_before_training(tmp_path):
    backbone = nn.Sequential(nn.Flatten(1, 2), nn.Conv1d(8, 4, 3), nn.Flatten(), nn.Linear(24, 10))
    trainer = _trainer(tmp_path, [QuantizeOnFitEnd(include=["Conv1d", "Linear"])])
    with pytest.raises(CompressionConfigError, match=r"with an int8 version .*Conv1d"):
        trainer.fit(Classifier(backbone), _loader())
    assert trainer.global_step == 0


def test_static_without_training_batches_fails_before_training(tmp_path):
    class NoData(Classifier):
        pass

    trainer = _trainer(tmp_path, [QuantizeOnFitEnd(mode="static")])
    with pytest.raises(
        CompressionConfigError, match=r"`mode`='static' to come with training batches.*no train dataloader"
    ):
        trainer.fit(NoData(MLP()))
    trainer = _trainer(tmp_path, [QuantizeOnFitEnd(mode="static")], limit_train_batches=0)
    with pytest.raises(CompressionConfigError, match="limit_train_batches=0"):
        trainer.fit(Classifier(MLP()), _loader())
    assert trainer.global_step == 0


def test_state_key_and_state_dict():
    cb = QuantizeOnFitEnd("static", per_channel=False, exclude=["net.5"])
    assert cb.state_key == (
        "QuantizeOnFitEnd{'mode': 'static', 'per_channel': False, 'include': ['Linear', 'Conv2d', 'Embedding'],"
        " 'exclude': ['net.5']}"
    )
    cb.report = {"layers_converted": 2}
    state = cb.state_dict()
    assert state == {
        "version": 1,
        "arguments": {
            "mode": "static",
            "per_channel": False,
            "include": ["Linear", "Conv2d", "Embedding"],
            "exclude": ["net.5"],
            "calibration_batches": cb.calibration_batches,
            "save_path": None,
            "qat_epochs": 0,
            "onnx_path": None,
        },
        "report": {"layers_converted": 2},
        "qat": {},
    }
    other = QuantizeOnFitEnd()
    with pytest.warns(UserWarning, match=r"resuming with different arguments: mode='dynamic' \(checkpoint: 'static'\)"):
        other.load_state_dict(state)
    assert other.report == {"layers_converted": 2}


# ---------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
def test_fit_ends_with_an_int8_model_that_validate_and_test_run(tmp_path, mode):
    model = Classifier(SmallCNN())
    cb = QuantizeOnFitEnd(mode, calibration_batches=4)
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(model, _loader())
    layers = int8_layers(model)
    assert set(layers) == {"backbone.features.0", "backbone.features.2", "backbone.classifier"}
    assert all(m.int8_weight.dtype == torch.int8 and m.mode == mode for m in layers.values())
    assert isinstance(model.backbone.features[0], Int8Conv2d)
    assert model.device.type == "cpu"

    calls = []
    model.backbone.classifier.register_forward_hook(lambda *args: calls.append(1))
    trainer.validate(model, _loader(), verbose=False)
    assert len(calls) == BATCHES  # the int8 layer computed every validation batch
    (result,) = trainer.test(model, _loader(), verbose=False)
    assert 0.0 <= result["test/acc"] <= 1.0

    r = cb.report
    assert r["layers_converted"] == 3 and r["layers"] == dict.fromkeys(layers, mode)
    assert r["kernels"] == {name: getattr(m, "kernel", "dequant") for name, m in layers.items()}
    assert all(k in ("float", "fbgemm_u8s8", "int_mm", "dequant") for k in (r["kernels"]["backbone.classifier"],))
    # A static convolution computes on its codes; this one (depth 1 x 3 x 3) is too shallow for oneDNN's.
    assert r["kernels"]["backbone.features.0"] == ("conv_codes" if mode == "static" else "dequant")
    expected_before = sum(
        4 * (m.weight.numel() + m.bias.numel()) for m in layers.values()
    )  # float32 weights and biases
    assert r["weight_bytes_before"] == expected_before
    expected_after = sum(m.weight.numel() + 4 * (m.bias.numel() + m.weight_scale.numel()) for m in layers.values())
    expected_after += 4 * sum(m.input_scale is not None for m in layers.values())
    expected_after += 4 * sum(getattr(m, "output_scale", None) is not None for m in layers.values())
    if mode == "static":  # the convolutions hold an input and an output scale, the Linear an input scale
        assert sum(m.input_scale is not None for m in layers.values()) == 3
        assert all(float(layers[n].output_scale) > 0 for n in ("backbone.features.0", "backbone.features.2"))
    assert r["weight_bytes_after"] == expected_after
    assert r["weight_bytes_ratio"] == pytest.approx(expected_after / expected_before)
    assert r["calibration_batches"] == 4
    assert 0 < r["relative_error"] < 0.05 and r["top1_agreement"] >= 0.9


def test_report_agreement_matches_a_reference_computed_by_hand(tmp_path):
    torch.manual_seed(0)
    model = Classifier(MLP())
    cb = QuantizeOnFitEnd("static", calibration_batches=3, verbose=0)
    snapshots = {}

    class Snapshot(pl.Callback):  # runs before QuantizeOnFitEnd's on_fit_end: keeps the float model
        def on_fit_end(self, trainer, pl_module):
            import copy

            snapshots["float"] = copy.deepcopy(pl_module.backbone).eval()

    trainer = _trainer(tmp_path, [Snapshot(), cb])
    loader = _loader()
    trainer.fit(model, loader)
    xs = [x for x, _ in list(loader)[:3]]
    float_net = snapshots["float"]
    linears = {n: m for n, m in float_net.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad(), record_input_ranges(linears) as obs:
        ref = torch.cat([float_net(x) for x in xs])
    for name, layer in int8_layers(model.backbone).items():
        assert layer.input_scale.item() == pytest.approx(obs[name].scale().item(), rel=1e-6)
    with torch.no_grad():
        out = torch.cat([model(x) for x in xs])
    assert cb.report["relative_error"] == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-4)
    assert cb.report["top1_agreement"] == pytest.approx(float((out.argmax(1) == ref.argmax(1)).float().mean()))


def test_report_is_printed_on_rank_zero_and_logged(tmp_path, caplog):
    model = Classifier(MLP())
    logger = CSVLogger(tmp_path, name="q", version=0)
    trainer = _trainer(tmp_path, [QuantizeOnFitEnd(calibration_batches=2)], logger=logger, log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, _loader())
    text = caplog.text
    assert "QuantizeOnFitEnd (dynamic, per channel): 3 layers converted to int8" in text
    assert "weight bytes: " in text and "top-1 agreement" in text
    with open(tmp_path / "q" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("quantize/weight_bytes_ratio")]
    assert len(rows) == 1
    assert float(rows[0]["quantize/layers_converted"]) == 3
    assert float(rows[0]["quantize/weight_bytes_ratio"]) == pytest.approx(0.26, abs=0.01)
    assert 0 < float(rows[0]["quantize/relative_error"]) < 0.05
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, [QuantizeOnFitEnd(verbose=0)]).fit(Classifier(MLP()), _loader())
    assert "QuantizeOnFitEnd" not in caplog.text


def test_save_path_artifact_restores_the_int8_model_exactly(tmp_path):
    path = tmp_path / "artifacts" / "model.int8.pt"
    model = Classifier(MLP())
    cb = QuantizeOnFitEnd("static", calibration_batches=2, save_path=str(path))
    _trainer(tmp_path, [cb]).fit(model, _loader())
    assert path.exists() and cb.report["save_path"] == str(path)
    fresh = load_compressed(path, Classifier(MLP()))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert isinstance(fresh.backbone.net[1], Int8Linear) and fresh.backbone.net[1].mode == "static"


def test_excluded_layers_and_the_compression_submodule(tmp_path):
    class Student(Classifier):
        compression_submodule = "backbone.net"

        def __init__(self):
            super().__init__(MLP())
            self.teacher = MLP()  # never called, never converted

    model = Student()
    cb = QuantizeOnFitEnd(exclude=["5"], calibration_batches=2)
    _trainer(tmp_path, [cb]).fit(model, _loader())
    assert set(int8_layers(model)) == {"backbone.net.1", "backbone.net.3"}
    assert isinstance(model.backbone.net[5], nn.Linear)
    assert all(type(m) is nn.Linear for m in model.teacher.modules() if isinstance(m, nn.Linear))
    assert cb.report["compressed_module"] == "backbone.net"


def test_dict_batches_are_calibrated_on_their_x_entry(tmp_path):
    class DictData(Classifier):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch["x"]), batch["y"])

    samples = [{"x": torch.rand(1, 8, 8), "y": torch.tensor(i % 10)} for i in range(12)]
    cb = QuantizeOnFitEnd(calibration_batches=2)
    _trainer(tmp_path, [cb], max_epochs=1).fit(DictData(MLP()), DataLoader(samples, batch_size=4))
    assert cb.report["calibration_batches"] == 2 and cb.report["relative_error"] is not None


def test_a_second_fit_on_the_int8_model_does_not_convert_again(tmp_path):
    model = Classifier(MLP())
    cb = QuantizeOnFitEnd(calibration_batches=2)
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, _loader())
    weights = {n: m.weight.clone() for n, m in int8_layers(model).items()}
    report = dict(cb.report)
    with pytest.warns(UserWarning, match="already int8"):
        _trainer(tmp_path, [cb], max_epochs=1).fit(model, _loader())
    assert cb.report == report
    assert all(torch.equal(m.weight, weights[n]) for n, m in int8_layers(model).items())


@pytest.mark.slow
def test_pruned_zeros_survive_quantization_in_one_fit(tmp_path):
    from lightning_compress import PruningCallback

    model = Classifier(MLP())
    pruning = PruningCallback(0.8, scope="layer", schedule="constant", verbose=0)  # no layer cut off
    cb = QuantizeOnFitEnd(calibration_batches=2, save_path=str(tmp_path / "m.pt"))
    zeros = {}

    class Zeros(pl.Callback):  # records the float zeros right before QuantizeOnFitEnd converts them
        def on_fit_end(self, trainer, pl_module):
            zeros.update({n: m.weight == 0 for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)})

    _trainer(tmp_path, [pruning, Zeros(), cb], max_epochs=2).fit(model, _loader())
    layers = int8_layers(model)
    assert set(layers) == set(zeros)
    total = sum(int(z.sum()) for z in zeros.values())
    assert total / sum(z.numel() for z in zeros.values()) == pytest.approx(0.8, abs=0.01)
    for name, layer in layers.items():
        assert torch.equal(layer.weight == 0, zeros[name])
    fresh = load_compressed(tmp_path / "m.pt", Classifier(MLP()))
    assert all(torch.equal(m.weight == 0, zeros[n]) for n, m in int8_layers(fresh).items())


def test_report_names_the_small_layers_that_compute_in_int8_for_large_calls(tmp_path, caplog):
    from lightning_compress.core.quant import kernels

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Classifier(MLP())
        cb = QuantizeOnFitEnd("static", calibration_batches=2)
        with caplog.at_level(logging.INFO):
            _trainer(tmp_path, [cb]).fit(model, _loader())
        rows = cb.report["int8_from_rows"]
    finally:
        torch.set_num_threads(saved)
    assert set(cb.report["kernels"].values()) == {"float"}
    if kernels.has_vnni() and kernels.fbgemm_available():  # 2^21 / (64 x 300) and 2^21 / (300 x 100)
        assert rows == {"backbone.net.1": 110, "backbone.net.3": 70}  # 100 x 10 never
        line = "2 small layer(s) compute in float, and in int8 from this many rows of a call (up to 512):"
        assert line in caplog.text
        assert "backbone.net.1 (110), backbone.net.3 (70)" in caplog.text
    else:
        assert rows == {} and "small layer(s)" not in caplog.text
