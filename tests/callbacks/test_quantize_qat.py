"""QuantizeOnFitEnd(qat_epochs=N): fake-quantized training in the last N epochs, then the same int8 conversion."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import DistillationModule, PruningCallback, QuantizeOnFitEnd
from lightning_compress.core.quant.convert import int8_layers
from lightning_compress.core.quant.kernels import use_kernel
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.quant.primitives import scale_from_range
from lightning_compress.demo import MLP, Classifier, DigitsDataModule
from lightning_compress.errors import CompressionConfigError


def _trainer(root: Path, callbacks: list[Callback], max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    return quiet_trainer(
        root,
        max_epochs=max_epochs,
        callbacks=callbacks,
        **{"limit_train_batches": 6, "limit_val_batches": 0, **kwargs},
    )


class _Watch(Callback):
    """Records, per training epoch, ``quant/qat`` and whether the Linears computed with a fake-quantized weight."""

    def __init__(self) -> None:
        self.qat: list[float] = []
        self.faked: list[dict[str, bool]] = []
        self._seen: dict[str, bool] = {}
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = list(pl_module.named_modules())
        if isinstance(pl_module, DistillationModule):  # the teacher is held outside the module tree
            modules += [(f"teacher.{n}", m) for n, m in pl_module.teacher.named_modules()]
        for name, m in modules:
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._hook(name)))  # runs before the QAT post-hook

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self._seen[name] = not isinstance(module._parameters["weight"], nn.Parameter)

        return hook

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.qat.append(float(trainer.callback_metrics["quant/qat"]))
        self.faked.append(dict(self._seen))
        self._seen = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._handles:
            h.remove()


@pytest.mark.parametrize("value", [-1, True, 1.5, "2", None])
def test_bad_qat_epochs_is_refused_at_construction(value: Any) -> None:
    with pytest.raises(CompressionConfigError, match=r"argument `qat_epochs` to be an integer.*but got"):
        QuantizeOnFitEnd(qat_epochs=value)


def test_qat_epochs_beyond_max_epochs_is_refused_at_setup(tmp_path: Path) -> None:
    cb = QuantizeOnFitEnd(qat_epochs=4, verbose=0)
    with pytest.raises(CompressionConfigError, match=r"`qat_epochs` to be at most the fit's `max_epochs` \(3\).*got 4"):
        _trainer(tmp_path, [cb], max_epochs=3).fit(Classifier(MLP(hidden=(16,))), DigitsDataModule())
    cb = QuantizeOnFitEnd(qat_epochs=1, verbose=0)
    with pytest.raises(CompressionConfigError, match=r"at most the fit's `max_epochs` \(-1\)"):
        _trainer(tmp_path, [cb], max_epochs=-1, max_steps=3).fit(Classifier(MLP(hidden=(16,))), DigitsDataModule())


def test_last_epochs_fake_quantize_and_log_quant_qat(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(32, 16)))
    watch = _Watch()
    cb = QuantizeOnFitEnd("static", per_channel=False, qat_epochs=2, calibration_batches=2, verbose=0)
    _trainer(tmp_path, [watch, cb], max_epochs=4).fit(model, DigitsDataModule())
    assert watch.qat == [0.0, 0.0, 1.0, 1.0]
    assert [all(f.values()) and bool(f) for f in watch.faked] == [False, False, True, True]
    assert not any(any(f.values()) for f in watch.faked[:2])
    assert cb.report["qat_epochs"] == 2
    layers = int8_layers(model)
    assert set(cb.report["layers"].values()) == {"static"} and len(layers) == 3
    # The input scales are the ranges QAT learned (kept in the callback's state).
    state = cb.state_dict()["qat"]
    for name, layer in layers.items():
        assert layer.input_scale is not None
        assert torch.equal(layer.input_scale, scale_from_range(state[name]["min"], state[name]["max"]))
    assert not cb._qat  # the hooks are gone
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_qat_logs_nothing_and_keeps_the_calibrated_path(tmp_path: Path) -> None:
    model = Classifier(MLP(hidden=(16,)))
    cb = QuantizeOnFitEnd("static", calibration_batches=2, verbose=0)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, DigitsDataModule())
    assert "quant/qat" not in trainer.callback_metrics
    assert cb.state_dict()["qat"] == {}


class _Reference(Callback):
    """The eval-mode output of the fake-quantized model right after the last QAT step."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.out: torch.Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.eval()
        with torch.no_grad():
            self.out = pl_module(self.x).clone()
        pl_module.train()


@pytest.mark.parametrize(("mode", "per_channel"), [("static", False), ("static", True), ("weight_only", True)])
def test_int8_model_computes_what_the_last_qat_forward_computed(tmp_path: Path, mode: str, per_channel: bool) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(32, 16)))
    x = torch.rand(64, 1, 8, 8)
    ref = _Reference(x)
    cb = QuantizeOnFitEnd(mode, per_channel=per_channel, qat_epochs=1, calibration_batches=3, verbose=0)
    _trainer(tmp_path, [ref, cb], max_epochs=2).fit(model, DigitsDataModule())
    assert ref.out is not None and isinstance(model.backbone.net[1], Int8Linear)
    model.eval()
    with torch.no_grad(), use_kernel("int_mm"):  # the int8 grid itself (the int8 product, as on CUDA)
        int8 = model(x)
    if mode == "weight_only":
        assert torch.equal(int8, ref.out)
        assert cb.report["relative_error"] == 0.0 and cb.report["top1_agreement"] == 1.0
    else:
        # The same integers; only the float accumulation order differs, and that may move a value that
        # lies within 1e-7 of a rounding boundary to the next code of the following layer's input grid
        # (measured: 10 of 640 logits of one image, 8.5e-4 apart).
        close = (int8 - ref.out).abs() <= 1e-5 + 1e-5 * ref.out.abs()
        assert float(close.float().mean()) >= 0.97
        assert float((int8 - ref.out).norm() / ref.out.norm()) < 1e-3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_checkpoint_mid_qat_loads_strict_and_resume_is_bit_identical(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(32, 16)))
    initial = copy.deepcopy(model.state_dict())
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full = QuantizeOnFitEnd("static", per_channel=False, qat_epochs=2, calibration_batches=2, verbose=0)
    _trainer(tmp_path / "full", [full, saver], max_epochs=3, enable_checkpointing=True).fit(model, DigitsDataModule())
    checkpoint = tmp_path / "ckpt" / "epoch=1.ckpt"  # after the first of two QAT epochs
    saved = torch.load(checkpoint, weights_only=True)
    plain = Classifier(MLP(hidden=(32, 16)))
    plain.load_state_dict(saved["state_dict"], strict=True)  # no fake-quant keys
    assert set(saved["state_dict"]) == set(initial)
    state = saved["callbacks"][full.state_key]
    assert state["arguments"]["qat_epochs"] == 2
    assert set(state["qat"]) == {"backbone.net.1", "backbone.net.3", "backbone.net.5"}
    assert all(v["count"] == 6 for v in state["qat"].values())  # one QAT epoch of 6 steps

    torch.manual_seed(123)  # the resumed run must not depend on the global random state
    resumed_model = Classifier(MLP(hidden=(32, 16)))
    resumed_model.load_state_dict(initial)
    resumed = QuantizeOnFitEnd("static", per_channel=False, qat_epochs=2, calibration_batches=2, verbose=0)
    _trainer(tmp_path / "resumed", [resumed], max_epochs=3).fit(resumed_model, DigitsDataModule(), ckpt_path=checkpoint)
    final, again = model.state_dict(), resumed_model.state_dict()
    assert final.keys() == again.keys()
    for key in final:
        assert torch.equal(final[key], again[key]), key
    assert resumed.state_dict()["qat"].keys() == full.state_dict()["qat"].keys()
    for name, v in full.state_dict()["qat"].items():
        w = resumed.state_dict()["qat"][name]
        assert torch.equal(v["min"], w["min"]) and torch.equal(v["max"], w["max"]) and v["count"] == w["count"] == 12


@pytest.mark.slow
def test_qat_with_pruning_keeps_pruned_weights_exactly_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Classifier(MLP(hidden=(32, 16)))
    pruning = PruningCallback(0.6, scope="layer", schedule="constant", verbose=0)
    watch = _Watch()
    zeros: dict[str, torch.Tensor] = {}

    class Zeros(Callback):
        def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            zeros.update({n: m.weight == 0 for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)})

    cb = QuantizeOnFitEnd("static", per_channel=False, qat_epochs=1, calibration_batches=2, verbose=0)
    _trainer(tmp_path, [pruning, watch, Zeros(), cb], max_epochs=2).fit(model, DigitsDataModule())
    assert watch.faked[-1] and all(watch.faked[-1].values())
    layers = int8_layers(model)
    assert set(layers) == set(zeros)
    for name, layer in layers.items():
        assert float(zeros[name].float().mean()) == pytest.approx(0.6, abs=0.02)
        assert torch.equal(layer.weight == 0, zeros[name])


@pytest.mark.slow
def test_qat_while_distilling_fake_quantizes_only_the_student(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = MLP(hidden=(48, 24))
    module = DistillationModule(MLP(hidden=(16,)), teacher)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    watch = _Watch()
    cb = QuantizeOnFitEnd("static", qat_epochs=1, calibration_batches=2, verbose=0)
    _trainer(tmp_path, [watch, cb], max_epochs=2).fit(module, DigitsDataModule())
    last = watch.faked[-1]
    student = {n for n in last if n.startswith("student.")}
    teacher_names = {n for n in last if n.startswith("teacher.")}
    assert student and teacher_names
    assert all(last[n] for n in student) and not any(last[n] for n in teacher_names)
    assert all(n.startswith("student.") for n in int8_layers(module))
    assert set(cb.state_dict()["qat"]) == {f"student.{n}" for n in ("net.1", "net.3")}
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def _qat_under_ddp(tmp_path: Path) -> tuple[dict, dict, dict]:
    """Run tests/scripts/ddp_quantize_qat.py; both ranks' int8 states must be equal: rank 0's, and both QAT states."""
    from helpers import load_ranks, run_ddp_script

    run_ddp_script("ddp_quantize_qat.py", tmp_path)
    state0, state1 = load_ranks(tmp_path, "state")
    assert state0.keys() == state1.keys()
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    qat0, qat1 = load_ranks(tmp_path, "qat")
    return state0, qat0, qat1


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_share_the_qat_ranges_and_convert_to_the_same_int8(tmp_path: Path) -> None:
    state0, qat0, qat1 = _qat_under_ddp(tmp_path)
    assert set(qat0) == set(qat1) == {"backbone.net.1", "backbone.net.3", "backbone.net.5"}
    for name in qat0:
        assert torch.equal(qat0[name]["min"], qat1[name]["min"]) and torch.equal(qat0[name]["max"], qat1[name]["max"])
        assert qat0[name]["count"] == 8  # 256 samples / 2 ranks / batch 16: one QAT epoch
        expected = scale_from_range(qat0[name]["min"], qat0[name]["max"])
        assert torch.equal(state0[f"{name}.input_scale"], expected)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_ranks_share_the_conv_input_and_output_ranges_of_qat(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LC_QAT_MODEL", "cnn")
    state0, qat0, qat1 = _qat_under_ddp(tmp_path)
    convs = {"backbone.features.0", "backbone.features.2"}
    assert set(qat0) == set(qat1) == convs | {"backbone.classifier"}
    for name in convs:
        out0, out1 = qat0[name]["output"], qat1[name]["output"]
        assert torch.equal(out0["min"], out1["min"]) and torch.equal(out0["max"], out1["max"]) and out0["count"] == 8
        assert torch.equal(state0[f"{name}.output_scale"], scale_from_range(out0["min"], out0["max"]))
        assert torch.equal(state0[f"{name}.input_scale"], scale_from_range(qat0[name]["min"], qat0[name]["max"]))
