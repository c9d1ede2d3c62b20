from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from lightning_compress.cli import COMPRESS_DEFAULTS, main
from lightning_compress.demo import Classifier

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TINY = ["--model.backbone=lightning_compress.demo.MLP", "--model.backbone.hidden=[16]"]
FEW = ["--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2"]
FIT = [*FEW, "--trainer.log_every_n_steps=1"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when ``args`` and ``sys.argv`` both hold arguments; under pytest only ``args`` do."""
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])


def _compress(tmp_path: Path, *extra: str) -> Path:
    main(
        [
            "compress",
            *TINY,
            *QUIET,
            *FEW,
            "--trainer.max_epochs=2",
            "--dense_epochs=1",
            "--latency_repeats=2",
            f"--trainer.default_root_dir={tmp_path}",
            *extra,
        ]
    )
    (folder,) = (tmp_path / "lightning_logs").iterdir()
    return folder


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "compress"):
        assert f"    {subcommand} " in out
    assert "Train the model dense, compress it" in out


def test_compress_help_shows_its_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    for argument in ("--dense_epochs", "--run_dir", "--stage", "--metric", "--latency_repeats", "--figure"):
        assert argument in out
    assert "--trainer.callbacks" in out and "--model" in out and "--data" in out


@pytest.mark.slow
def test_compress_runs_the_default_recipe_and_saves_a_config_that_reloads(tmp_path):
    folder = _compress(tmp_path)
    assert {p.name for p in folder.iterdir()} >= {
        "config.yaml",
        "metrics.csv",
        "original.pt",
        "compressed.pt",
        "report.json",
        "report.txt",
        "report.png",
    }
    config = yaml.safe_load((folder / "config.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    assert [c["class_path"] for c in callbacks] == [c["class_path"] for c in COMPRESS_DEFAULTS["callbacks"]]
    assert callbacks[0]["init_args"]["target_sparsity"] == 0.9 and callbacks[1]["init_args"]["strength"] == 1e-5
    assert config["trainer"]["max_epochs"] == 2  # given, so not replaced
    assert config["trainer"]["log_every_n_steps"] == COMPRESS_DEFAULTS["log_every_n_steps"]
    assert config["dense_epochs"] == 1 and config["seed_everything"] == 0

    report = json.loads((folder / "report.json").read_text())
    assert report["compressed"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert {layer["dtype"] for layer in report["compressed"]["layers"]} == {"int8"}
    assert report["settings"]["compress_epochs"] == 2 and report["settings"]["dense_epochs"] == 1

    # the saved config runs again as it is, to the same numbers (seeded)
    again = tmp_path / "again"
    main(["compress", "--config", str(folder / "config.yaml"), f"--trainer.default_root_dir={again}"])
    (folder_again,) = (again / "lightning_logs").iterdir()
    report_again = json.loads((folder_again / "report.json").read_text())
    for role in ("original", "compressed"):
        for key in ("accuracy", "nonzero_params", "weight_bytes", "artifact_bytes"):
            assert report_again[role][key] == report[role][key], (role, key)


def test_compress_fills_in_epochs_when_unset(tmp_path, monkeypatch):
    monkeypatch.setitem(COMPRESS_DEFAULTS, "max_epochs", 1)
    main(
        [
            "compress",
            *TINY,
            *QUIET,
            *FEW,
            "--dense_epochs=0",
            "--latency_repeats=1",
            "--figure=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    (folder,) = (tmp_path / "lightning_logs").iterdir()
    assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == 1
    assert json.loads((folder / "report.json").read_text())["settings"]["compress_epochs"] == 1


def test_compress_with_given_callbacks_uses_only_those(tmp_path):
    folder = _compress(tmp_path, "--trainer.callbacks+=lightning_compress.QuantizeOnFitEnd", "--figure=false")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == ["lightning_compress.QuantizeOnFitEnd"]
    report = json.loads((folder / "report.json").read_text())
    assert report["compressed"]["sparsity"] < 0.01  # nothing pruned: int8 only
    assert {layer["dtype"] for layer in report["compressed"]["layers"]} == {"int8"}
    assert not (folder / "report.png").exists()


@pytest.mark.slow
def test_fit_takes_callbacks_by_class_path_and_a_cnn_backbone(tmp_path):
    main(
        [
            "fit",
            "--model.backbone=lightning_compress.demo.SmallCNN",
            "--model.backbone.channels=[4,8]",
            "--trainer.callbacks+=lightning_compress.PruningCallback",
            "--trainer.callbacks.target_sparsity=0.5",
            "--trainer.callbacks.verbose=0",
            "--trainer.max_epochs=2",
            *FIT,
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    weights = [
        state[k] for k in ("backbone.features.0.weight", "backbone.features.2.weight", "backbone.classifier.weight")
    ]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)
    # a plain model takes the checkpoint's keys as they are
    from lightning_compress.demo import SmallCNN

    Classifier(backbone=SmallCNN(channels=(4, 8))).load_state_dict(state, strict=True)


def test_runs_repeat_with_the_default_seed(tmp_path):
    def train(root: Path) -> dict[str, torch.Tensor]:
        main(["fit", *TINY, *QUIET, *FIT, "--trainer.max_epochs=1", f"--trainer.default_root_dir={root}"])
        (checkpoint,) = root.rglob("*.ckpt")
        return torch.load(checkpoint, weights_only=True)["state_dict"]

    first, second = train(tmp_path / "a"), train(tmp_path / "b")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "fit",
                "--trainer.callbacks+=lightning_compress.PruningCallback",
                "--trainer.callbacks.target_sparsity=1.5",
            ],
            "Expected argument `target_sparsity` to be a number in [0, 1), but got 1.5.",
        ),
        (
            ["compress", "--dense_epochs=-1"],
            "Expected argument `dense_epochs` to be an integer in [0, inf), but got -1.",
        ),
        (
            ["compress", *TINY, *FEW, "--metric=test/accuracy"],
            "Expected argument `metric` to be one of the metrics that Classifier logs in `test` ('test/acc',"
            " 'test/loss'), but got 'test/accuracy'.",
        ),
        (
            [
                "fit",
                "--trainer.callbacks+=lightning_compress.PruningCallback",
                "--trainer.callbacks.target_sparsity=0.5",
                "--trainer.callbacks.exclude=[backbone.*]",
                "--trainer.max_epochs=1",
            ],
            "Expected arguments `include`=['Linear', 'Conv1d', 'Conv2d', 'Conv3d'] and `exclude`=['backbone.*'] to"
            " select at least one weight, but they selected none. The model has these module types with a weight:"
            " ['Linear'].",
        ),
    ],
)
def test_user_mistakes_end_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *QUIET, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"lightning-compress: error: {message}"
    assert "Traceback" not in err


def test_missing_extra_ends_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *QUIET, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lightning-compress: error: The digits data set comes from scikit-learn")
    assert last.endswith('pip install "lightning-compress[demo]"')


def test_a_bug_is_not_hidden(tmp_path, monkeypatch):
    """Only user mistakes are shortened: any other exception keeps its traceback."""

    class Broken(Classifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("a bug in the model")

    module = types.ModuleType("cli_test_models")
    module.Broken = Broken
    Broken.__module__ = "cli_test_models"
    monkeypatch.setitem(sys.modules, "cli_test_models", module)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        main(
            [
                "fit",
                "--model=cli_test_models.Broken",
                *QUIET,
                *FIT,
                "--trainer.max_epochs=1",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


@pytest.mark.slow
def test_console_prints_no_traceback_for_a_mistake(tmp_path):
    command = [
        sys.executable,
        "-m",
        "lightning_compress",
        "fit",
        "--trainer.callbacks+=lightning_compress.QuantizeOnFitEnd",
        "--trainer.callbacks.mode=fast",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "lightning-compress: error: Expected argument `mode` to be one of 'dynamic', 'static' or 'weight_only',"
            " but got 'fast'."
        )
    )


# Lightning notes that the new run's checkpoint folder differs from the one the checkpoint came from.
@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")
def test_validate_test_and_predict_from_a_checkpoint(tmp_path, capsys):
    main(["fit", *TINY, *QUIET, *FIT, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}"])
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    common = [
        *TINY,
        *QUIET,
        *FIT,
        "--trainer.logger=false",
        f"--ckpt_path={checkpoint}",
    ]
    for subcommand in ("validate", "test", "predict"):
        main([subcommand, *common, f"--trainer.default_root_dir={tmp_path / subcommand}"])
        assert (tmp_path / subcommand / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "val/acc" in out and "test/acc" in out


def _printed_model(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]


def test_the_demo_is_the_default_model(capsys):
    model = _printed_model(capsys, "--model.lr=0.01")
    assert model["class_path"] == "lightning_compress.demo.Classifier"
    assert model["init_args"]["lr"] == 0.01 and model["init_args"]["num_classes"] == 10


@pytest.mark.parametrize("how", ["argument", "config"])
def test_a_named_model_keeps_its_own_defaults(capsys, tmp_path, how):
    # With the demo as a default instance, jsonargparse would carry the demo's num_classes=10 and
    # weight_decay=0.0 into DistillationModule in place of its own None and 0.01.
    student = {"class_path": "lightning_compress.demo.MLP", "init_args": {"hidden": [8]}}
    init = {"student": student, "teacher": student}
    if how == "argument":
        args = ["--model=lightning_compress.DistillationModule", f"--model.init_args={json.dumps(init)}"]
    else:
        config = tmp_path / "distill.yaml"
        config.write_text(
            yaml.safe_dump({"model": {"class_path": "lightning_compress.DistillationModule", "init_args": init}})
        )
        args = ["--config", str(config)]
    model = _printed_model(capsys, *args)
    assert model["class_path"] == "lightning_compress.DistillationModule"
    assert model["init_args"]["num_classes"] is None
    assert model["init_args"]["weight_decay"] == 0.01
