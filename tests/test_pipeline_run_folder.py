"""The run folder of ``compress`` (issue 18): checked before any training, its report written last and tied to
its artifacts, and marked incomplete until then."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer

from lightning_compress import CompressionConfigError, QuantizeOnFitEnd
from lightning_compress.cli import main
from lightning_compress.demo import MLP, Classifier, DigitsDataModule
from lightning_compress.pipeline import CompressTrainer
from lightning_compress.pipeline.result import INCOMPLETE_MARKER, check_run_folder, file_record

TINY = ["--model.backbone=lightning_compress.demo.MLP", "--model.backbone.hidden=[16]"]
FEW = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _trainer(tmp_path):
    return quiet_trainer(
        tmp_path,
        trainer_class=CompressTrainer,
        callbacks=[QuantizeOnFitEnd(verbose=0)],
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        num_sanity_val_steps=0,
    )


def _compress(trainer, run_dir, seed=0):
    torch.manual_seed(seed)
    model = Classifier(backbone=MLP(hidden=(16,)))
    return trainer.compress(
        model, DigitsDataModule(batch_size=32), dense_epochs=1, run_dir=str(run_dir), latency_repeats=1
    )


@pytest.fixture
def no_training(monkeypatch):
    fits = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: fits.append(1))
    return fits


def test_a_run_dir_under_a_file_is_refused_before_any_training(tmp_path, no_training):
    (tmp_path / "afile").write_text("")
    with pytest.raises(
        CompressionConfigError,
        match=r"Expected argument `run_dir` to be a folder that can be created and written to, but got '.*afile/run'\."
        r" It cannot: '.*afile' is a file, not a folder\.",
    ):
        _compress(_trainer(tmp_path), tmp_path / "afile" / "run")
    assert no_training == []
    with pytest.raises(CompressionConfigError, match=r"`run_dir` to be the path of a folder, but got 3"):
        _trainer(tmp_path).compress(Classifier(), run_dir=3)  # type: ignore[arg-type]


def test_the_command_line_refuses_a_run_dir_under_a_file_before_training(tmp_path, monkeypatch, capsys, no_training):
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["compress", *TINY, *FEW, *QUIET, "--trainer.logger=false", f"--run_dir={tmp_path / 'afile' / 'run'}"])
    assert info.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert no_training == []


def test_compress_twice_without_a_logger_in_one_folder_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])
    args = ["compress", *TINY, *FEW, *QUIET, "--trainer.max_epochs=1", "--dense_epochs=0", "--latency_repeats=1"]
    args += ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    main(args)
    assert (tmp_path / "config.yaml").is_file() and check_run_folder(tmp_path) == []
    fits = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: fits.append(1))
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"Expected the log folder {str(tmp_path)!r} to hold no config.yaml of an earlier run" in err
    assert fits == []


def test_the_report_is_written_last_and_names_its_artifacts(tmp_path):
    result = _compress(_trainer(tmp_path), tmp_path / "run")
    folder = tmp_path / "run"
    report = json.loads((folder / "report.json").read_text())
    for role in ("original", "compressed"):
        assert report["artifacts"][role] == file_record(folder / f"{role}.pt")
        assert report["artifacts"][role]["bytes"] == (folder / f"{role}.pt").stat().st_size
    assert result.artifacts == report["artifacts"]
    assert not (folder / INCOMPLETE_MARKER).exists()
    assert check_run_folder(folder) == []
    newest = max(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "report.json"
    # An artifact changed after the run no longer matches its report.
    data = bytearray((folder / "compressed.pt").read_bytes())
    data[-100] ^= 0xFF
    (folder / "compressed.pt").write_bytes(bytes(data))
    assert check_run_folder(folder) == [
        "compressed: compressed.pt is not the file report.json describes (another size or SHA-256)"
    ]


def test_a_rerun_killed_half_way_leaves_the_folder_marked_incomplete(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _compress(_trainer(tmp_path), folder)
    old_report = (folder / "report.json").read_text()
    from lightning_compress.core import serialize

    real_save = serialize.save_compressed
    saved = []

    def save_then_die(module, path):
        real_save(module, path)
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt  # killed after the new artifacts, before the report

    monkeypatch.setattr(serialize, "save_compressed", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _compress(_trainer(tmp_path), folder, seed=1)  # another model, so other artifacts
    assert (folder / "report.json").read_text() == old_report  # the old report is still there ...
    assert (folder / INCOMPLETE_MARKER).exists()  # ... but the folder says it is not one run
    problems = check_run_folder(folder)
    assert problems[0] == f"{INCOMPLETE_MARKER} is present: a run started here and did not finish"
    assert any("is not the file report.json describes" in p for p in problems[1:])


def test_a_rerun_refused_during_training_marks_the_old_folder_before_it_starts(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _compress(_trainer(tmp_path), folder)
    marked = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: marked.append((folder / INCOMPLETE_MARKER).exists()))
    monkeypatch.setattr(CompressTrainer, "fit", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _compress(_trainer(tmp_path), folder)
    assert marked == [True]  # already marked when the dense training started


def test_check_run_folder_on_folders_without_a_report(tmp_path):
    assert check_run_folder(tmp_path) == ["no report.json: the run did not finish"]
    (tmp_path / "report.json").write_text("{not json")
    assert check_run_folder(tmp_path)[0].startswith("report.json cannot be read")
    (tmp_path / "report.json").write_text(json.dumps({"format": "lightning-compress-report", "version": 1}))
    assert check_run_folder(tmp_path) == ["report.json names no artifacts (written before lightning-compress 0.2)"]
    Path(tmp_path / "report.json").write_text(json.dumps({"artifacts": {"original": {"path": "x/original.pt"}}}))
    assert check_run_folder(tmp_path) == ["original: original.pt is missing"]
