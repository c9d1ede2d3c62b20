"""The comparison of the original and the compressed model: one table, one JSON report."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.report import _human_bytes
from lightning_compress.pipeline.measure import Measurement

__all__ = ["INCOMPLETE_MARKER", "REPORT_VERSION", "ComparisonResult", "check_run_folder", "file_record"]

REPORT_VERSION = 1
"""The ``"version"`` entry of ``report.json``."""

INCOMPLETE_MARKER = "INCOMPLETE"
"""A file that ``compress`` puts in the run folder while its files are not all from one finished run.

It is written before the first artifact of a run (or, when the folder holds an earlier run's report,
before any training), and removed only after ``report.json`` (written last, atomically) names the
sizes and SHA-256 digests of the artifacts beside it."""


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.fspath(path), "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_run_folder(folder: str | os.PathLike[str]) -> list[str]:
    """What is wrong with a run folder of ``compress``; an empty list when it is one finished run.

    A folder is complete when it has no :data:`INCOMPLETE_MARKER`, its ``report.json`` reads, and
    every artifact that the report lists has the size and SHA-256 digest the report gives it.

    Example:
        >>> import tempfile
        >>> check_run_folder(tempfile.mkdtemp())
        ['no report.json: the run did not finish']
    """
    folder = Path(folder)
    problems = []
    if (folder / INCOMPLETE_MARKER).exists():
        problems.append(f"{INCOMPLETE_MARKER} is present: a run started here and did not finish")
    try:
        report = json.loads((folder / "report.json").read_text())
    except FileNotFoundError:
        return [*problems, "no report.json: the run did not finish"]
    except (OSError, ValueError) as err:
        return [*problems, f"report.json cannot be read: {err}"]
    artifacts = report.get("artifacts") if isinstance(report, dict) else None
    if not isinstance(artifacts, dict) or not artifacts:
        return [*problems, "report.json names no artifacts (written before lightning-compress 0.2)"]
    for role, record in artifacts.items():
        name = Path(str(record.get("path", ""))).name if isinstance(record, dict) else ""
        path = folder / name
        if not name or not path.is_file():
            problems.append(f"{role}: {name or '?'} is missing")
            continue
        now = file_record(path)
        if (now["bytes"], now["sha256"]) != (record.get("bytes"), record.get("sha256")):
            problems.append(f"{role}: {name} is not the file report.json describes (another size or SHA-256)")
    return problems


def _ratio(new: float, old: float) -> float | None:
    return new / old if old else None


@dataclass(frozen=True)
class ComparisonResult:
    """The original (dense, float) model against the compressed one.

    Attributes:
        metric: name of the accuracy metric, as the model logs it (e.g. ``"test/acc"``).
        original: numbers of the model after dense training.
        compressed: numbers of the model after the compression fit.
        settings: how the run was made (epochs, callbacks, batch size, threads, versions).
        files: paths of what the run wrote (artifacts, report, figure), by role.
        artifacts: :func:`file_record` of each artifact, by role: what ties ``report.json`` to them.
    """

    metric: str
    original: Measurement
    compressed: Measurement
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float | None]:
        """Compressed over original for the sizes and the latency; ``accuracy_delta`` in points.

        ``latency`` below 1 means the compressed model is faster; ``None`` where the original is 0.
        """
        o, c = self.original, self.compressed
        return {
            "accuracy_delta": None if c.accuracy is None or o.accuracy is None else (c.accuracy - o.accuracy) * 100.0,
            "nonzero_params": _ratio(c.nonzero_params, o.nonzero_params),
            "weight_bytes": _ratio(c.weight_bytes, o.weight_bytes),
            "artifact_bytes": _ratio(c.artifact_bytes, o.artifact_bytes),
            "latency": _ratio(c.latency_ms, o.latency_ms),
            # The compressed model in ONNX Runtime against the original in PyTorch (what deploying gains).
            "latency_onnxruntime": None
            if c.latency_ms_onnxruntime is None
            else _ratio(c.latency_ms_onnxruntime, o.latency_ms),
        }

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The table's rows: (what, original, compressed, ratio) as formatted strings."""
        o, c, r = self.original, self.compressed, self.ratios

        def times(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}x"

        def fraction(value: float | None, spec: str) -> str:
            return "not logged" if value is None else format(value, spec)

        delta = r["accuracy_delta"]
        return [
            (
                f"accuracy ({self.metric})",
                fraction(o.accuracy, ".2%"),
                fraction(c.accuracy, ".2%"),
                "n/a" if delta is None else f"{delta:+.2f} pt",
            ),
            ("nonzero parameters", f"{o.nonzero_params:,}", f"{c.nonzero_params:,}", times(r["nonzero_params"])),
            ("weight bytes", _human_bytes(o.weight_bytes), _human_bytes(c.weight_bytes), times(r["weight_bytes"])),
            (
                "artifact on disk",
                _human_bytes(o.artifact_bytes),
                _human_bytes(c.artifact_bytes),
                times(r["artifact_bytes"]),
            ),
            ("CPU latency / batch", f"{o.latency_ms:.3f} ms", f"{c.latency_ms:.3f} ms", times(r["latency"])),
            *self._onnxruntime_rows(),
        ]

    def _onnxruntime_rows(self) -> list[tuple[str, str, str, str]]:
        """The ONNX Runtime latency row, when both exports were measured (ratio: to the original in PyTorch)."""
        o, c = self.original.latency_ms_onnxruntime, self.compressed.latency_ms_onnxruntime
        if o is None or c is None:
            return []
        ratio = self.ratios["latency_onnxruntime"]
        shown = "n/a" if ratio is None else f"{ratio:.3f}x"
        return [("ONNX Runtime latency / batch", f"{o:.3f} ms", f"{c:.3f} ms", f"{shown} of PyTorch original")]

    def table(self) -> str:
        """A fixed-width text table of :meth:`rows` with a header."""
        header = ("", "original", "compressed", "compressed/original")
        rows = [header, *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as GitHub markdown."""
        lines = ["| | original | compressed | compressed / original |", "|---|---:|---:|---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view of everything: both measurements (with per-layer rows), ratios, settings, files."""
        return {
            "format": "lightning-compress-report",
            "version": REPORT_VERSION,
            "metric": self.metric,
            "original": self.original.to_dict(),
            "compressed": self.compressed.to_dict(),
            "ratios": self.ratios,
            "settings": self.settings,
            "files": self.files,
            "artifacts": self.artifacts,
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as indented JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        return self.table()
