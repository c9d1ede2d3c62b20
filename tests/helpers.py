"""Helpers shared by the test modules: ``from helpers import quiet_trainer``.

pytest puts this folder on ``sys.path`` (it holds ``conftest.py`` and no ``__init__.py``), so the
test modules in its subfolders import it the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch

_T = TypeVar("_T", bound=pl.Trainer)

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


def quiet_trainer(
    tmp_path: Path,
    *,
    trainer_class: type[_T] = pl.Trainer,  # type: ignore[assignment]
    **kwargs: Any,
) -> _T:
    """A Trainer that prints and writes nothing the test did not ask for; `kwargs` override the defaults.

    The defaults: no logger, progress bar, model summary, checkpoints or sanity check, and
    ``default_root_dir=tmp_path``. ``trainer_class`` builds a subclass such as ``CompressTrainer``.
    """
    return trainer_class(**{**QUIET, "default_root_dir": tmp_path, **kwargs})


SCRIPTS = Path(__file__).parent / "scripts"
"""Scripts the DDP tests run in a subprocess (``strategy="ddp"`` under pytest would re-launch pytest)."""


def run_ddp_script(name: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tests/scripts/<name> OUT`` (two CPU processes with gloo) and check that it succeeded.

    The script runs in its own process group; past ``timeout`` seconds the whole group (the ranks
    Lightning launched included) is killed and the test fails with what the script printed.
    """
    cmd = [sys.executable, str(SCRIPTS / name), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{name} ran past {timeout} s and was killed:\n{stdout[-3000:]}{stderr[-3000:]}") from None
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load_ranks(out: Path, name: str) -> tuple[Any, Any]:
    """What ranks 0 and 1 saved as ``OUT/<name>_rank<r>.pt``, loaded with ``weights_only=True``."""
    return tuple(torch.load(out / f"{name}_rank{rank}.pt", weights_only=True) for rank in (0, 1))  # type: ignore[return-value]


@contextlib.contextmanager
def one_rank_gloo_group() -> Iterator[None]:
    """A gloo process group of one rank in this process (DTensors on a 1-rank mesh), destroyed on exit.

    A test that needs it is skipped when a process group exists already.
    """
    import socket

    import pytest
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
