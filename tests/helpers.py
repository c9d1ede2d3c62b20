"""Helpers shared by the test modules: ``from helpers import quiet_trainer``.

pytest puts this folder on ``sys.path`` (it holds ``conftest.py`` and no ``__init__.py``), so the
test modules in its subfolders import it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl

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
