"""The run's figure: what compression kept, per layer and in total (matplotlib, an optional extra)."""

from __future__ import annotations

import os

from lightning_compress.core.files import atomic_write
from lightning_compress.pipeline.result import ComparisonResult

__all__ = ["MATPLOTLIB_HINT", "matplotlib_available", "write_figure"]

MATPLOTLIB_HINT = 'The figure needs matplotlib. Install it with: pip install "lightning-compress[plot]"'


def matplotlib_available() -> bool:
    """Whether ``matplotlib`` can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_figure(result: ComparisonResult, path: str | os.PathLike[str]) -> None:
    """Draw per-layer sparsity and the compressed/original ratios into a PNG file, atomically.

    Left: the fraction of exact zeros of every layer weight of the compressed model, with its storage
    type. Right: nonzero parameters, weight bytes, artifact size and CPU latency of the compressed
    model as a fraction of the original's (log scale), with the two accuracies in the title.

    Raises:
        ImportError: if matplotlib is not installed (the message names the ``plot`` extra).
    """
    try:
        import matplotlib  # noqa: F401 - first, so that a missing package is reported as such
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(MATPLOTLIB_HINT) from err

    layers = result.compressed.report.layers
    figure = Figure(figsize=(11, max(3.2, 0.38 * len(layers) + 1.6)), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[1.2, 1])

    names = [layer.name or "(root)" for layer in layers]
    sparsity = [layer.sparsity * 100 for layer in layers]
    positions = range(len(layers))
    bars = left.barh(positions, sparsity, color="#4C72B0")
    left.set_yticks(list(positions), [f"{n}  [{layer.dtype}]" for n, layer in zip(names, layers, strict=True)])
    left.invert_yaxis()
    left.set_xlim(0, 112)  # room for the labels
    left.set_xticks([0, 20, 40, 60, 80, 100])
    left.set_xlabel("exact zeros in the weight (%)")
    left.set_title(f"Per-layer sparsity of the compressed model (total {result.compressed.report.sparsity:.1%})")
    left.bar_label(bars, labels=[f"{s:.1f}%" for s in sparsity], padding=2, fontsize=8)

    ratios = result.ratios
    keys = [
        ("nonzero_params", "nonzero\nparameters"),
        ("weight_bytes", "weight\nbytes"),
        ("artifact_bytes", "artifact\non disk"),
        ("latency", "CPU latency\nper batch"),
        ("latency_onnxruntime", "ONNX Runtime\nlatency"),
    ]
    shown = [(label, ratios[k]) for k, label in keys if ratios[k]]  # a ratio is None when the original is 0
    values = [v for _, v in shown if v is not None]
    colors = ["#55A868" if v <= 1 else "#C44E52" for v in values]
    # Bars grow from the original (1) down to a ratio below 1 or up to one above.
    bars = right.bar([label for label, _ in shown], [v - 1.0 for v in values], bottom=1.0, color=colors)
    right.axhline(1.0, color="black", linewidth=1, linestyle="--", label="original = 1")
    right.bar_label(bars, labels=[f"{v:.3f}x" for v in values], padding=3, fontsize=9)
    right.set_yscale("log")  # 0.09x and 3x both readable
    right.set_ylim(min([*values, 1.0]) / 2.5, max([*values, 1.0]) * 2.5)
    right.set_ylabel("compressed / original (log scale)")
    right.legend(loc="upper left", fontsize=8)
    o, c = result.original.accuracy, result.compressed.accuracy
    right.set_title(
        f"{result.metric}: not logged by the model"
        if o is None or c is None
        else f"{result.metric}: {o:.2%} original, {c:.2%} compressed"
    )

    atomic_write(path, lambda f: figure.savefig(f, dpi=110, format="png"))
