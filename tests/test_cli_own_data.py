"""The command line runs a model's own data (`BoringModel`, a model with its own loaders) as LightningCLI does."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from test_cli import FEW, FIT, QUIET, TINY

from lightning_compress.cli import main
from lightning_compress.demo import Classifier


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when ``args`` and ``sys.argv`` both hold arguments; under pytest only ``args`` do."""
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])


class OwnLoaders(Classifier):
    """A demo classifier that brings its own loaders (on the digits), as many user models do."""

    def _loader(self, stage: str):
        from lightning_compress.demo import DigitsDataModule

        data = DigitsDataModule(batch_size=32)
        data.prepare_data()
        data.setup(stage)
        return getattr(data, f"{'val' if stage == 'validate' else stage}_dataloader")()

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("validate")

    def test_dataloader(self):
        return self._loader("test")


def _saved_config(tmp_path: Path) -> dict:
    (config,) = tmp_path.glob("lightning_logs/version_*/config.yaml")
    return yaml.safe_load(config.read_text())


def test_fit_runs_boring_model_on_its_own_data(tmp_path):
    # The demo data would reach BoringModel's Linear(32, 2) as 64 pixels and fail; plain LightningCLI runs it.
    main(
        [
            "fit",
            "--model=lightning.pytorch.demos.boring_classes.BoringModel",
            *QUIET,
            *FIT,
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert _saved_config(tmp_path)["data"] is None
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


def test_fit_and_compress_keep_a_models_own_loaders(tmp_path, monkeypatch):
    module = types.ModuleType("cli_own_loaders")
    module.OwnLoaders = OwnLoaders
    monkeypatch.setattr(OwnLoaders, "__module__", "cli_own_loaders")
    monkeypatch.setitem(sys.modules, "cli_own_loaders", module)
    main(["fit", "--model=cli_own_loaders.OwnLoaders", *TINY, *QUIET, *FIT, "--trainer.max_epochs=1",
          f"--trainer.default_root_dir={tmp_path / 'fit'}"])  # fmt: skip
    assert _saved_config(tmp_path / "fit")["data"] is None
    main(
        ["compress", "--model=cli_own_loaders.OwnLoaders", *TINY, *QUIET, *FEW, "--trainer.max_epochs=2",
         "--dense_epochs=1", "--latency_repeats=2", "--figure=false", f"--trainer.default_root_dir={tmp_path / 'c'}"]
    )  # fmt: skip
    assert _saved_config(tmp_path / "c")["data"] is None
    assert json.loads(next((tmp_path / "c").glob("lightning_logs/version_*/report.json")).read_text())
    # naming data still uses it, and the demo model still gets the demo data
    main(["fit", *TINY, *QUIET, *FIT, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'demo'}"])
    assert _saved_config(tmp_path / "demo")["data"]["class_path"] == "lightning_compress.demo.DigitsDataModule"


def test_compress_runs_boring_model_that_logs_no_metric(tmp_path):
    # BoringModel logs nothing in `test`: the default metric is optional, the report has no accuracy.
    with pytest.warns(UserWarning, match=r"BoringModel logs no metric in `test`, so the report compares sizes"):
        main(
            ["compress", "--model=lightning.pytorch.demos.boring_classes.BoringModel", *QUIET, *FEW,
             "--trainer.max_epochs=2", "--dense_epochs=1", "--latency_repeats=2", "--figure=false",
             f"--trainer.default_root_dir={tmp_path}"]
        )  # fmt: skip
    report = json.loads(next(tmp_path.glob("lightning_logs/version_*/report.json")).read_text())
    assert report["original"]["accuracy"] is None and report["compressed"]["accuracy"] is None
    assert report["ratios"]["accuracy_delta"] is None
    # its test batches hold one sample: the ONNX files are exported on two and timed on the one
    assert report["compressed"]["latency_ms_onnxruntime"] > 0
    assert report["compressed"]["params"] == report["original"]["params"] == 32 * 2 + 2
    assert report["compressed"]["nonzero_params"] < report["original"]["nonzero_params"]  # it was pruned
    table = next(tmp_path.glob("lightning_logs/version_*/report.txt")).read_text()
    assert "accuracy (test/acc)" in table and "not logged" in table


def test_compress_with_a_named_metric_the_model_does_not_log_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["compress", "--model=lightning.pytorch.demos.boring_classes.BoringModel", *QUIET, *FEW,
             "--trainer.max_epochs=2", "--dense_epochs=1", "--figure=false", "--metric=test/acc",
             f"--trainer.default_root_dir={tmp_path}"]
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "metrics that BoringModel logs in `test` (none), but got 'test/acc'" in capsys.readouterr().err
