"""The comparison of the original and the compressed model: one table, one JSON report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.report import _human_bytes
from lightning_compress.pipeline.measure import Measurement

__all__ = ["REPORT_VERSION", "ComparisonResult", "atomic_write_text"]

REPORT_VERSION = 1
"""The ``"version"`` entry of ``report.json``."""


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
    """

    metric: str
    original: Measurement
    compressed: Measurement
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ratios(self) -> dict[str, float | None]:
        """Compressed over original for the sizes and the latency; ``accuracy_delta`` in points.

        ``latency`` below 1 means the compressed model is faster; ``None`` where the original is 0.
        """
        o, c = self.original, self.compressed
        return {
            "accuracy_delta": (c.accuracy - o.accuracy) * 100.0,
            "nonzero_params": _ratio(c.nonzero_params, o.nonzero_params),
            "weight_bytes": _ratio(c.weight_bytes, o.weight_bytes),
            "artifact_bytes": _ratio(c.artifact_bytes, o.artifact_bytes),
            "latency": _ratio(c.latency_ms, o.latency_ms),
        }

    def rows(self) -> list[tuple[str, str, str, str]]:
        """The table's rows: (what, original, compressed, ratio) as formatted strings."""
        o, c, r = self.original, self.compressed, self.ratios

        def times(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}x"

        return [
            (f"accuracy ({self.metric})", f"{o.accuracy:.2%}", f"{c.accuracy:.2%}", f"{r['accuracy_delta']:+.2f} pt"),
            ("nonzero parameters", f"{o.nonzero_params:,}", f"{c.nonzero_params:,}", times(r["nonzero_params"])),
            ("weight bytes", _human_bytes(o.weight_bytes), _human_bytes(c.weight_bytes), times(r["weight_bytes"])),
            (
                "artifact on disk",
                _human_bytes(o.artifact_bytes),
                _human_bytes(c.artifact_bytes),
                times(r["artifact_bytes"]),
            ),
            ("CPU latency / batch", f"{o.latency_ms:.3f} ms", f"{c.latency_ms:.3f} ms", times(r["latency"])),
        ]

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
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as indented JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def __str__(self) -> str:
        return self.table()
