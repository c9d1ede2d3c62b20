"""What the benchmark scripts share: one quiet Trainer, int8 conversion as ``QuantizeOnFitEnd`` does it,
file sizes, a timing child process, and the markdown and JSON files of the results.

A script imports it after putting its own folder first on ``sys.path`` (so that it also works when a
smoke test loads the script from its path)::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import bench_trainer, to_int8
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.convert import quantize

RESULTS = Path(__file__).resolve().parent / "results"
"""Where a benchmark writes its ``.md`` and ``.json`` files unless ``--out`` says otherwise."""

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""Nothing printed or written that a measurement did not ask for."""


def bench_trainer(**kwargs: Any) -> pl.Trainer:
    """A ``Trainer`` with :data:`QUIET` settings; ``kwargs`` are the script's own (and override them)."""
    return pl.Trainer(**{**QUIET, **kwargs})


def first_batches(batches: Iterable[Any], n: int) -> list[Any]:
    """The first ``n`` batches of a loader: the calibration ``QuantizeOnFitEnd`` uses (``calibration_batches``)."""
    return list(islice(batches, n))


def to_int8(model: nn.Module, mode: str = "dynamic", per_channel: bool = True, calibration: Iterable[Any] = ()) -> Any:
    """An int8 copy of ``model``, converted as ``QuantizeOnFitEnd`` does (``core.quant.convert.quantize``).

    Static scales are observed on ``calibration`` (batches, fed as the callback feeds them); a layer
    they never reach stays dynamic, as in the callback. The copy is returned in eval mode; ``model``
    is untouched.
    """
    converted = copy.deepcopy(model).eval()
    quantize(converted, mode, per_channel, calibration=calibration)
    return converted


def ao_dynamic(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` through ``torch.ao.quantization.quantize_dynamic`` (the deprecated peer).

    ``None`` where this torch has no ``torch.ao.quantization``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            return None
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def seeds_parser(doc: str | None, epochs: int) -> argparse.ArgumentParser:
    """The arguments of a digits benchmark over seeds: ``--smoke``, ``--seeds``, ``--epochs``, ``--calibration-batches``
    and ``--out``; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--calibration-batches", type=int, default=32, help="training batches static int8 observes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    return parser


def file_bytes(write: Callable[[str], None]) -> int:
    """The size in bytes of the file ``write(path)`` writes (in a temporary folder, removed afterwards)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "f.pt")
        write(path)
        return os.path.getsize(path)


RESULT = "RESULT "
"""What starts the line in which a child process of :func:`run_child` prints its JSON result."""


def run_child(script: Path, args: Sequence[str], threads: int) -> tuple[dict[str, Any], str]:
    """Run ``script`` with ``args`` in a child process with ``threads`` OpenMP/MKL threads; its last ``RESULT`` line.

    One thread runs pinned to core 1 (``taskset -c 1``) where taskset exists and the core is ours.
    Returns the parsed JSON and how the child was launched, e.g. ``OMP_NUM_THREADS=1 taskset -c 1 (child)``.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *args]
    pin = threads == 1 and shutil.which("taskset") is not None and 1 in os.sched_getaffinity(0)
    if pin:
        cmd = ["taskset", "-c", "1", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    shown = f"OMP_NUM_THREADS={threads} " + ("taskset -c 1 " if pin else "") + "(child)"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"latency child ({shown}) failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len(RESULT) :]), shown


def table_head(*columns: str) -> list[str]:
    """The first two lines of a markdown table: its column names and the separator row."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_results(out: Path, stem: str, result: dict[str, Any], markdown: list[str]) -> None:
    """Write ``out/<stem>.json`` and ``out/<stem>.md`` (atomically; ``out`` is created) and say so."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", "\n".join(markdown) + "\n")):
        atomic_write_text(out / f"{stem}{suffix}", text)
    print(f"wrote {out / stem}.md and .json")
