import pytest
import torch

from lightning_compress import save_compressed
from lightning_compress.core.files import atomic_torch_save, atomic_write_text


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_files_get_the_permissions_of_a_plain_file(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


def test_compressed_artifacts_get_the_permissions_of_a_plain_file(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({}, plain)
    save_compressed(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    assert (tmp_path / "model.pt").stat().st_mode == plain.stat().st_mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
