from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_compress import (
    CompressionConfigError,
    PruningCallback,
    QuantizeOnFitEnd,
    SparseRegularizer,
    compression_report,
    load_compressed,
)
from lightning_compress.demo import MLP, Classifier, DigitsDataModule
from lightning_compress.pipeline import (
    ComparisonResult,
    CompressTrainer,
    Measurement,
    default_callbacks,
    measure_latencies,
    write_figure,
)


def _trainer(tmp_path: Path, callbacks=None, **kwargs) -> CompressTrainer:
    settings = {
        "max_epochs": 2,
        "limit_train_batches": 4,
        "limit_val_batches": 1,
        "limit_test_batches": 2,
        "num_sanity_val_steps": 2,
        **kwargs,
    }
    if callbacks is None:
        callbacks = [PruningCallback(0.5, verbose=0), SparseRegularizer(1e-5, verbose=0), QuantizeOnFitEnd(verbose=0)]
    return quiet_trainer(tmp_path, trainer_class=CompressTrainer, callbacks=callbacks, **settings)


def _model() -> Classifier:
    return Classifier(backbone=MLP(hidden=(32,)))


def _test_accuracy(module: pl.LightningModule, tmp_path: Path) -> float:
    trainer = quiet_trainer(tmp_path, limit_test_batches=2, num_sanity_val_steps=2)
    return trainer.test(module, DigitsDataModule(batch_size=32), verbose=False)[0]["test/acc"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One miniature compress run shared by the tests that read its results."""
    tmp_path = tmp_path_factory.mktemp("compress")
    torch.manual_seed(0)
    model = _model()
    trainer = _trainer(tmp_path)
    result = trainer.compress(
        model, DigitsDataModule(batch_size=32), dense_epochs=1, run_dir=str(tmp_path / "run"), latency_repeats=3
    )
    return result, model, tmp_path


def test_compress_measures_both_models(run):
    result, model, _ = run
    original, compressed = result.original, result.compressed
    # the original is the dense float model; the compressed one is half zeros, in int8
    assert original.report.sparsity < 0.01 and {layer.dtype for layer in original.report.layers} == {"float32"}
    assert compressed.report.sparsity == pytest.approx(0.5, abs=0.01)
    assert {layer.dtype for layer in compressed.report.layers} == {"int8"}
    # the numbers are those of the model as it stands after the run
    now = compression_report(model)
    assert (compressed.params, compressed.nonzero_params, compressed.weight_bytes) == (
        now.params,
        now.nonzero_params,
        now.weight_bytes,
    )
    assert original.params == compressed.params  # same architecture, every entry counted
    assert compressed.weight_bytes < 0.3 * original.weight_bytes
    assert compressed.artifact_bytes < original.artifact_bytes
    assert original.latency_ms > 0 and compressed.latency_ms > 0
    assert result.settings["batch_size"] == 32 and result.settings["dense_epochs"] == 1
    assert result.settings["artifact_roundtrip_max_abs_diff"] == 0.0


def test_compress_writes_reloadable_artifacts_and_reports(run):
    result, model, tmp_path = run
    folder = tmp_path / "run"
    from lightning_compress.export.runtime import runtime_available

    onnx_files = ["compressed.onnx", "original.onnx"] if runtime_available() else []
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["compressed.pt", "original.pt", "report.json", "report.png", "report.txt", *onnx_files]
    )
    for role in ("original", "compressed"):
        assert os.path.getsize(result.files[role]) == getattr(result, role).artifact_bytes
        assert torch.load(result.files[role], weights_only=True)["format"] == "lightning-compress"
    # the compressed artifact rebuilds the compressed model: same outputs, same accuracy
    restored = load_compressed(result.files["compressed"], _model())
    x = torch.randn(16, 1, 8, 8)
    model.eval()
    restored.eval()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    assert _test_accuracy(restored, tmp_path) == pytest.approx(result.compressed.accuracy)
    # the original artifact is the dense model, with the accuracy the report gives it
    dense = load_compressed(result.files["original"], _model())
    assert _test_accuracy(dense, tmp_path) == pytest.approx(result.original.accuracy)
    assert compression_report(dense).sparsity < 0.01

    report = json.loads((folder / "report.json").read_text())
    assert report == json.loads(json.dumps(result.to_dict()))
    assert report["compressed"]["artifact_bytes"] == os.path.getsize(folder / "compressed.pt")
    assert (folder / "report.txt").read_text() == result.table() + "\n"
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_and_table_are_computed_from_the_measurements(run):
    result, _, _ = run
    o, c = result.original, result.compressed
    assert result.ratios == {
        "accuracy_delta": pytest.approx((c.accuracy - o.accuracy) * 100),
        "nonzero_params": c.nonzero_params / o.nonzero_params,
        "weight_bytes": c.weight_bytes / o.weight_bytes,
        "artifact_bytes": c.artifact_bytes / o.artifact_bytes,
        "latency": c.latency_ms / o.latency_ms,
        "latency_onnxruntime": None if c.latency_ms_onnxruntime is None else c.latency_ms_onnxruntime / o.latency_ms,
    }
    onnx_rows = ["ONNX Runtime latency / batch"] if c.latency_ms_onnxruntime is not None else []
    table = result.table().splitlines()
    assert [line.split("  ")[0] for line in table[2:]] == [
        "accuracy (test/acc)",
        "nonzero parameters",
        "weight bytes",
        "artifact on disk",
        "CPU latency / batch",
        *onnx_rows,
    ]
    assert f"{result.ratios['weight_bytes']:.3f}x" in table[4]
    assert result.markdown().count("\n") == 6 + len(onnx_rows)


def test_compress_writes_and_times_the_onnx_models(run):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result, _, tmp_path = run
    folder = tmp_path / "run"
    assert (folder / "original.onnx").is_file() and (folder / "compressed.onnx").is_file()
    report = json.loads((folder / "report.json").read_text())
    for role in ("original", "compressed"):
        assert report[role]["latency_ms_onnxruntime"] > 0
    assert result.compressed.latency_ms_onnxruntime == report["compressed"]["latency_ms_onnxruntime"]
    assert "ONNX Runtime latency / batch" in result.table()


def _measurement(accuracy: float, nonzero: int, weight_bytes: int, artifact: int, latency: float) -> Measurement:
    report = compression_report(nn.Linear(2, 2))
    return Measurement(accuracy, 100, nonzero, weight_bytes, artifact, latency, report)


def test_comparison_result_handles_zero_baselines():
    result = ComparisonResult(
        metric="val/acc",
        original=_measurement(0.9, 100, 400, 0, 2.0),
        compressed=_measurement(0.85, 10, 100, 50, 1.0),
    )
    ratios = result.ratios
    assert ratios["artifact_bytes"] is None and ratios["latency"] == 0.5
    assert ratios["accuracy_delta"] == pytest.approx(-5.0)
    assert "n/a" in result.table() and "-5.00 pt" in result.table() and "accuracy (val/acc)" in str(result)


def test_figure_leaves_out_a_ratio_without_baseline(tmp_path):
    result = ComparisonResult(
        metric="val/acc",
        original=_measurement(0.9, 100, 400, 0, 2.0),
        compressed=_measurement(0.85, 10, 100, 50, 1.0),
    )
    write_figure(result, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_measure_latencies_takes_the_median_of_interleaved_calls_in_alternating_order():
    now = [0.0]
    calls: list[str] = []

    class Costly(nn.Module):
        def __init__(self, name: str, seconds: list[float]):
            super().__init__()
            self.name, self.seconds = name, iter(seconds)

        def forward(self, x):
            calls.append(self.name)
            now[0] += next(self.seconds)
            return x

    a = Costly("a", [9.0, 1.0, 2.0, 100.0])  # one warm-up call, then 1, 2, 100 -> median 2 s
    b = Costly("b", [9.0, 3.0, 3.0, 4.0])
    a.train()
    b.eval()
    latencies = measure_latencies([a, b], torch.zeros(1), repeats=3, warmup=1, clock=lambda: now[0])
    assert latencies == [2000.0, 3000.0]
    assert calls == ["a", "b"] * 2 + ["b", "a"] + ["a", "b"]  # warm-up, then in turns, every other round reversed
    assert a.training and not b.training  # modes restored


def test_measure_latencies_times_runners_in_the_same_turns_after_the_modules():
    now = [0.0]
    calls: list[str] = []

    class Step(nn.Module):
        def forward(self, x):
            calls.append("module")
            now[0] += 2.0
            return x

    def runner():
        calls.append("runner")
        now[0] += 0.5

    latencies = measure_latencies([Step()], torch.zeros(1), repeats=4, warmup=1, clock=lambda: now[0], runners=[runner])
    assert latencies == [2000.0, 500.0]
    assert calls == ["module", "runner"] + ["module", "runner", "runner", "module"] * 2  # reversed every other round


def test_measure_latencies_reads_how_to_call_each_model_once_outside_the_clock(monkeypatch):
    import importlib

    measure_module = importlib.import_module("lightning_compress.pipeline.measure")
    made: list[int] = []
    now = [0.0]
    real = measure_module.model_call

    def counting(model, batch):
        made.append(id(model))
        now[0] += 1000.0  # a model call read inside the timed region would add 1000 s
        return real(model, batch)

    class Step(nn.Module):
        def forward(self, x, y=None):
            now[0] += 0.5
            return x

    a, b = Step(), Step()
    monkeypatch.setattr(measure_module, "model_call", counting)
    latencies = measure_latencies([a, b], (torch.zeros(1), torch.ones(1)), repeats=4, warmup=2, clock=lambda: now[0])
    assert latencies == [500.0, 500.0]
    assert made == [id(a), id(b)]


def test_default_callbacks_are_the_documented_three():
    pruning, regularizer, quantize = default_callbacks()
    assert isinstance(pruning, PruningCallback) and pruning.target_sparsity == 0.9
    assert isinstance(regularizer, SparseRegularizer) and regularizer.strength == 1e-5
    assert isinstance(quantize, QuantizeOnFitEnd) and quantize.mode == "dynamic"
    assert default_callbacks()[0] is not pruning  # fresh instances


def test_run_folder_defaults_to_the_logger_folder(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="logs")
    trainer = _trainer(
        tmp_path, logger=logger, max_epochs=1, log_every_n_steps=2, callbacks=[QuantizeOnFitEnd(verbose=0)]
    )
    result = trainer.compress(
        _model(), DigitsDataModule(batch_size=32), dense_epochs=0, latency_repeats=1, figure=False
    )
    folder = Path(logger.log_dir)
    assert folder == tmp_path / "logs" / "version_0"
    assert Path(result.files["report_json"]).parent == folder and (folder / "metrics.csv").exists()
    assert "figure" not in result.files and not (folder / "report.png").exists()
    assert result.compressed.report.sparsity < 0.01  # no pruning configured: int8 only


def test_without_matplotlib_the_run_says_how_to_get_the_figure(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[QuantizeOnFitEnd(verbose=0)])
    with caplog.at_level("INFO"):
        result = trainer.compress(
            _model(), DigitsDataModule(), dense_epochs=0, run_dir=str(tmp_path), latency_repeats=1
        )
    assert "figure" not in result.files and not (tmp_path / "report.png").exists()
    assert 'pip install "lightning-compress[plot]"' in caplog.text
    with pytest.raises(ImportError, match=r"The figure needs matplotlib.*lightning-compress\[plot\]"):
        write_figure(result, tmp_path / "report.png")


def test_warns_when_no_callback_compresses(tmp_path):
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[])
    with pytest.warns(UserWarning, match="none of PruningCallback, SparseRegularizer or QuantizeOnFitEnd"):
        result = trainer.compress(
            _model(), DigitsDataModule(), dense_epochs=0, run_dir=str(tmp_path), latency_repeats=1
        )
    assert result.compressed.nonzero_params == result.original.nonzero_params


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dense_epochs": -1}, r"Expected argument `dense_epochs` to be an integer in \[0, inf\), but got -1"),
        ({"dense_epochs": 1.5}, r"Expected argument `dense_epochs` to be an integer, but got 1.5"),
        ({"stage": "train"}, r"Expected argument `stage` to be one of 'test' or 'validate', but got 'train'"),
        ({"metric": ""}, r"Expected argument `metric` to be the name of a logged metric such as 'test/acc'"),
        ({"latency_repeats": 0}, r"Expected argument `latency_repeats` to be an integer in \[1, inf\), but got 0"),
        (
            {"metric": "test/accuracy"},
            r"Expected argument `metric` to be one of the metrics that Classifier logs in `test` "
            r"\('test/acc', 'test/loss'\), but got 'test/accuracy'",
        ),
        (
            {"stage": "validate", "metric": "test/acc"},
            r"logs in `validate` \('val/acc', 'val/loss'\), but got 'test/acc'",
        ),
    ],
)
def test_bad_arguments_fail_before_training(tmp_path, kwargs, match):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompressionConfigError, match=match):
        _trainer(tmp_path).compress(model, DigitsDataModule(), run_dir=str(tmp_path / "run"), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing trained
    assert not (tmp_path / "run").exists()


def test_several_devices_are_refused(tmp_path):
    trainer = _trainer(tmp_path, accelerator="cpu", devices=2, strategy="ddp")
    with pytest.raises(CompressionConfigError, match=r"Expected argument `trainer.devices` to be a single device"):
        trainer.compress(_model(), DigitsDataModule())


def test_batches_the_model_cannot_take_are_refused_before_training(tmp_path):
    class DictData(pl.LightningDataModule):
        def test_dataloader(self):  # a dict batch is `model(**batch)`: forward(x) has no `image` argument
            batch = {"image": torch.zeros(2, 1, 8, 8), "y": torch.zeros(2, dtype=torch.long)}
            return torch.utils.data.DataLoader([batch], batch_size=None)

    class DictClassifier(Classifier):
        def test_step(self, batch, batch_idx):
            super().test_step((batch["image"], batch["y"]), batch_idx)

    with pytest.raises(CompressionConfigError, match=r"compress cannot call .* missing a required argument: 'x'"):
        _trainer(tmp_path).compress(DictClassifier(backbone=MLP(hidden=(8,))), DictData())


def test_a_compression_fit_bounded_by_steps(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_epochs=None, max_steps=3, callbacks=[PruningCallback(0.5, verbose=0)])
    with caplog.at_level("INFO"):
        result = trainer.compress(_model(), DigitsDataModule(), dense_epochs=0, run_dir=str(tmp_path), figure=False)
    assert trainer.global_step == 3
    assert result.settings["compress_steps"] == 3
    assert "compressing with PruningCallback for 3 steps" in caplog.text
    assert result.compressed.report.sparsity == pytest.approx(0.5, abs=0.01)


def test_the_dense_phase_runs_like_the_compression_fit(tmp_path):
    """Same hardware, precision, limits and progress bar; no callbacks, logger or checkpoints of its own."""
    trainer = CompressTrainer(
        max_epochs=7,
        precision="bf16-mixed",
        limit_train_batches=3,
        accumulate_grad_batches=2,
        callbacks=[QuantizeOnFitEnd(verbose=0)],
        default_root_dir=tmp_path,
    )
    dense = trainer._sibling(max_epochs=5)
    assert dense.progress_bar_callback is not None and trainer.progress_bar_callback is not None
    assert (dense.max_epochs, dense.limit_train_batches, dense.accumulate_grad_batches) == (5, 3, 2)
    assert dense.precision == "bf16-mixed" and dense.default_root_dir == str(tmp_path)
    assert dense.logger is None and dense.checkpoint_callback is None
    assert not any(isinstance(c, QuantizeOnFitEnd) for c in dense.callbacks)
    quiet = CompressTrainer(enable_progress_bar=False, default_root_dir=tmp_path)._sibling()
    assert quiet.progress_bar_callback is None


def test_a_data_module_says_whether_its_data_are_in_memory(tmp_path, monkeypatch):
    """``compress`` asks the data module (``in_memory_data``, the PipelineData protocol), never its type."""
    from contextlib import contextmanager

    import lightning_compress.pipeline.trainer as pipeline_trainer
    from lightning_compress.pipeline import PipelineData

    class Tensors(pl.LightningDataModule):
        in_memory_data = True

    class Files(pl.LightningDataModule):
        pass

    class Unclear(pl.LightningDataModule):
        in_memory_data = "yes"  # only True counts

    seen = []

    @contextmanager
    def recording(in_memory_data=False):
        seen.append(in_memory_data)
        yield

    monkeypatch.setattr(pipeline_trainer, "quiet_known_warnings", recording)
    monkeypatch.setattr(CompressTrainer, "_compress", lambda self, *args: "compressed")
    for data in (DigitsDataModule(), Tensors(), Files(), Unclear(), None):
        assert _trainer(tmp_path).compress(_model(), data, run_dir=str(tmp_path / "run")) == "compressed"
    assert seen == [True, True, False, False, False]
    assert isinstance(DigitsDataModule(), PipelineData) and isinstance(Tensors(), PipelineData)
    assert not isinstance(Files(), PipelineData)
