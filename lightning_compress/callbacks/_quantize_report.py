"""What ``QuantizeOnFitEnd`` counts, logs and prints, and the check of its ONNX path.

Plain functions of the report dict and the modules, so that the callback stays about *when*.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_compress.core.quant.crossover import CROSSOVER_MAX_ROWS
from lightning_compress.core.quant.kernels import int8_from_rows
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.selection import Target
from lightning_compress.errors import config_error

__all__ = ["check_onnx_path", "float_layers", "int8_rows", "owned_bytes", "report_metrics", "summary"]


def owned_bytes(*modules: nn.Module) -> int:
    """Bytes of the tensors the modules own themselves, each tensor counted once (a tied weight is one)."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def int8_rows(layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """``{name: rows}`` of the ``"float"``-kernel Linear layers that compute in int8 from that many rows.

    At the current torch thread count (:mod:`~lightning_compress.core.quant.crossover`).
    """
    out = {}
    for name, layer in layers.items():
        rows = int8_from_rows(layer) if isinstance(layer, Int8Linear) else None
        if rows is not None:
            out[name] = rows
    return out


def float_layers(model: nn.Module, targets: Sequence[Target]) -> dict[str, nn.Module]:
    """``{name: float module}`` of the targets and their tied partners, before they are converted."""
    layers = {t.name: t.module for t in targets}
    for t in targets:
        for key in getattr(t, "tied", ()):
            name = key.rpartition(".")[0]
            try:
                layers.setdefault(name, model.get_submodule(name))
            except AttributeError:
                continue
    return layers


def check_onnx_path(path: str) -> None:
    """Refuse, before training, an ``onnx_path`` that cannot be written or an export that cannot run."""
    from lightning_compress.core.files import folder_problem
    from lightning_compress.export._deps import EXTRA_HINT, available

    if os.path.isdir(path):
        raise config_error("onnx_path", "the path of a file, not a folder", path)
    problem = folder_problem(os.path.dirname(os.path.abspath(path)))
    if problem is not None:
        raise config_error("onnx_path", "a path whose folder can be written", path, problem)
    missing = [name for name in ("onnx", "onnxscript") if not available(name)]
    if missing:
        raise config_error("onnx_path", f"None unless {' and '.join(missing)} are installed ({EXTRA_HINT})", path)


def report_metrics(r: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as ``quantize/...`` metrics for every logger."""
    return {
        f"quantize/{k}": float(r[k])
        for k in (
            "layers_converted",
            "weight_bytes_before",
            "weight_bytes_after",
            "weight_bytes_ratio",
            "model_bytes_before",
            "model_bytes_after",
            "relative_error",
            "top1_agreement",
        )
        if r.get(k) is not None
    }


def summary(r: dict[str, Any]) -> str:
    """The report as the lines printed at fit end."""
    lines = [
        f"QuantizeOnFitEnd ({r['mode']}, {'per channel' if r['per_channel'] else 'per tensor'}):"
        f" {r['layers_converted']} layers converted to int8 in {r['compressed_module']}",
        f"  weight bytes: {r['weight_bytes_before']:,} -> {r['weight_bytes_after']:,}"
        f" ({r['weight_bytes_ratio']:.3f}x); model bytes: {r['model_bytes_before']:,} ->"
        f" {r['model_bytes_after']:,}",
    ]
    if r["relative_error"] is not None:
        top1 = "n/a" if r["top1_agreement"] is None else f"{r['top1_agreement']:.2%}"
        lines.append(
            f"  float vs int8 on {r['calibration_batches']} calibration batches: relative output error"
            f" {r['relative_error']:.4f}, top-1 agreement {top1}"
        )
    crossings = r.get("int8_from_rows") or {}
    if crossings:
        named = ", ".join(f"{n} ({rows})" for n, rows in list(crossings.items())[:3])
        more = f", and {len(crossings) - 3} more" if len(crossings) > 3 else ""
        lines.append(
            f"  {len(crossings)} small layer(s) compute in float, and in int8 from this many rows of a call"
            f" (up to {CROSSOVER_MAX_ROWS}): {named}{more}"
        )
    for name, why in {**r["fallbacks"], **r["skipped"]}.items():
        lines.append(f"  {name}: {why}")
    folded = r.get("folded") or {}
    if folded:
        pairs = ", ".join(f"{bn} -> {conv}" for bn, conv in list(folded.items())[:3])
        more = f", and {len(folded) - 3} more" if len(folded) > 3 else ""
        lines.append(f"  {len(folded)} batch norm(s) folded into their convolutions: {pairs}{more}")
    grids = r.get("input_grids") or {}
    if grids:
        names = ", ".join(list(grids)[:3]) + (f", and {len(grids) - 3} more" if len(grids) > 3 else "")
        lines.append(f"  {len(grids)} residual block input(s) on their convolution's int8 grid: {names}")
    if r["save_path"]:
        lines.append(f"  artifact written to {r['save_path']}")
    return "\n".join(lines)
