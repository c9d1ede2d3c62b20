import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lightning_compress
from lightning_compress import save_compressed
from lightning_compress.core.files import atomic_torch_save, atomic_write_text, folder_problem, stale_temporary_files


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


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from lightning_compress.core.files import atomic_write

    def write(f):
        f.write(b"x" * 1_000_000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the write

    atomic_write(sys.argv[1], write)
    """
)


def _run_killed_writer(tmp_path, target):
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    package_root = Path(lightning_compress.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(target)], env=env, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL


def _temporaries(folder, name="model.pt"):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.") and p.name.endswith(".tmp"))


def test_a_write_killed_midway_leaves_the_old_file_and_the_next_write_removes_its_temporary(tmp_path):
    folder = tmp_path / "out"
    target = folder / "model.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)
    _run_killed_writer(tmp_path, target)
    left = _temporaries(folder)
    assert len(left) == 1 and (folder / left[0]).stat().st_size == 1_000_000  # what 0.1 never cleaned up
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    atomic_torch_save({"a": torch.zeros(2)}, target)
    assert _temporaries(folder) == []
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(2))


def test_cleanup_spares_live_writers_other_files_and_fresh_old_style_temporaries(tmp_path):
    host = stale_temporary_files.__globals__["_host"]()
    live = tmp_path / f".model.pt.{host}-1.abcd1234.tmp"  # pid 1 is always running
    own = tmp_path / f".model.pt.{host}-{os.getpid()}.abcd1234.tmp"  # another thread of this process
    other_host = tmp_path / ".model.pt.elsewhere-99999999.abcd1234.tmp"
    fresh_legacy = tmp_path / ".model.pt.k3j_x9aa.tmp"
    old_legacy = tmp_path / ".model.pt.zz11yy22.tmp"
    other_name = tmp_path / ".other.pt.zz11yy22.tmp"
    for p in (live, own, other_host, fresh_legacy, old_legacy, other_name):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for p in (old_legacy, other_name, other_host):
        os.utime(p, (hour_ago, hour_ago))
    dead = tmp_path / f".model.pt.{host}-999999999.abcd1234.tmp"
    dead.write_bytes(b"partial")
    assert set(stale_temporary_files(tmp_path / "model.pt")) == {old_legacy, dead}
    atomic_write_text(tmp_path / "model.pt", "new")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {p.name for p in (live, own, other_host, fresh_legacy, other_name)} | {"model.pt"}


def test_a_parent_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"Cannot write '.*afile/m.pt': '.*afile' is a file, not a folder\."):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "afile" / "m.pt")
    with pytest.raises(NotADirectoryError, match=r"'.*afile' is a file, not a folder"):
        atomic_write_text(tmp_path / "afile" / "deeper" / "m.txt", "x")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_target_that_is_a_folder_is_refused_without_writing_into_its_parent(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(IsADirectoryError, match=r"Cannot write '.*models': it is a folder\. Give the path of a file"):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "models")
    assert [p.name for p in tmp_path.iterdir()] == ["models"]
    assert list((tmp_path / "models").iterdir()) == []


def test_folder_problem(tmp_path):
    assert folder_problem(tmp_path / "new" / "run") is None
    assert not (tmp_path / "new").exists()  # nothing is created
    (tmp_path / "afile").write_text("")
    assert folder_problem(tmp_path / "afile") == f"{str(tmp_path / 'afile')!r} is a file, not a folder"
    assert folder_problem(tmp_path / "afile" / "run") == f"{str(tmp_path / 'afile')!r} is a file, not a folder"
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert folder_problem(locked / "run") == f"{str(locked)!r} is not writable"
