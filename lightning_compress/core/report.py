"""Honest size accounting: per-layer and total parameters, exact zeros and bytes.

The numbers are read from the tensors the model really holds, so a pruned float model reports
its zeros but no byte saving, and an int8 model reports one byte per weight plus its scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CompressionReport", "LayerStats", "compression_report"]


@dataclass(frozen=True)
class LayerStats:
    """Numbers for one layer that owns a ``weight`` matrix or kernel."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    zeros: int
    bytes: int

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are exactly zero."""
        return self.zeros / self.params if self.params else 0.0


@dataclass(frozen=True)
class CompressionReport:
    """Per-layer and total parameters, zeros and bytes of a model.

    ``layers`` lists every module owning a ``weight`` with at least two dimensions (Linear,
    Conv, Embedding and their int8 versions); its ``bytes`` counts all tensors the layer owns
    directly (weight, bias, scales). The totals cover every parameter and buffer of the model.
    """

    layers: tuple[LayerStats, ...]
    params: int
    zeros: int
    bytes: int

    @property
    def weight_params(self) -> int:
        """Entries of the layer weights."""
        return sum(layer.params for layer in self.layers)

    @property
    def weight_zeros(self) -> int:
        """Exact zeros among the layer weights."""
        return sum(layer.zeros for layer in self.layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes held by the layers (weights, biases, scales)."""
        return sum(layer.bytes for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of layer-weight entries that are exactly zero."""
        return self.weight_zeros / self.weight_params if self.weight_params else 0.0

    @property
    def nonzero_params(self) -> int:
        """Parameters (and quantized weights) that are not exactly zero."""
        return self.params - self.zeros

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the totals and one dict per layer."""
        layers = [{**asdict(layer), "shape": list(layer.shape), "sparsity": layer.sparsity} for layer in self.layers]
        return {
            "layers": layers,
            "params": self.params,
            "zeros": self.zeros,
            "nonzero_params": self.nonzero_params,
            "bytes": self.bytes,
            "weight_params": self.weight_params,
            "weight_zeros": self.weight_zeros,
            "weight_bytes": self.weight_bytes,
            "sparsity": self.sparsity,
        }

    def table(self) -> str:
        """A fixed-width text table: one row per layer, then the total over the layers."""
        header = ("layer", "type", "shape", "dtype", "params", "zeros", "sparsity", "bytes")
        rows = [
            (
                layer.name or "(root)",
                layer.kind,
                "x".join(map(str, layer.shape)),
                layer.dtype,
                f"{layer.params:,}",
                f"{layer.zeros:,}",
                f"{layer.sparsity:.1%}",
                _human_bytes(layer.bytes),
            )
            for layer in self.layers
        ]
        total = (
            "total",
            "",
            "",
            "",
            f"{self.weight_params:,}",
            f"{self.weight_zeros:,}",
            f"{self.sparsity:.1%}",
            _human_bytes(self.weight_bytes),
        )
        widths = [max(len(str(r[i])) for r in (header, *rows, total)) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            left = {0, 1, 3}
            return "  ".join(
                c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        rule = "-" * len(line(header))
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total)])

    def __str__(self) -> str:
        return self.table()


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _zeros(t: Tensor) -> int:
    return int(t.numel() - torch.count_nonzero(t.detach()).item())


def _stored(module: nn.Module, attr: str) -> Tensor | None:
    """The tensor stored under ``attr``: an int8 layer's buffer (its ``weight`` attribute is a float-typed view)."""
    stored = module._buffers.get(attr)
    if isinstance(stored, Tensor):
        return stored
    found = getattr(module, attr, None)
    return found if isinstance(found, Tensor) else None


@torch.no_grad()
def compression_report(module: nn.Module) -> CompressionReport:
    """Count parameters, exact zeros and bytes of ``module``, per layer and in total.

    Args:
        module: any ``nn.Module``: float, pruned or int8.

    Returns:
        A :class:`CompressionReport`; ``str(report)`` is a table, ``report.to_dict()`` a JSON view.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(4, 2)
        >>> _ = layer.weight.data[0].zero_()
        >>> r = compression_report(layer)
        >>> r.weight_params, r.weight_zeros, r.sparsity
        (8, 4, 0.5)
    """
    layers = []
    for name, sub in module.named_modules():
        weight = _stored(sub, "weight")
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        owned = [t for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)) if t is not None]
        layers.append(
            LayerStats(
                name=name,
                kind=type(sub).__name__,
                shape=tuple(weight.shape),
                dtype=str(weight.dtype).removeprefix("torch."),
                params=weight.numel(),
                zeros=_zeros(weight),
                bytes=sum(_nbytes(t) for t in owned),
            )
        )
    seen: set[int] = set()
    params = zeros = nbytes = 0
    layer_weights = {id(_stored(sub, attr)) for sub in module.modules() for attr in ("weight", "in_proj_weight")}
    for is_param, tensors in ((True, module.parameters()), (False, module.buffers())):
        for t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            nbytes += _nbytes(t)
            if is_param or id(t) in layer_weights:
                params += t.numel()
                zeros += _zeros(t)
    return CompressionReport(layers=tuple(layers), params=params, zeros=zeros, bytes=nbytes)
