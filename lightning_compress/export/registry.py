"""Which export form each int8 layer kind gets, and the swap that puts them in place for one export.

Keyed by the ``Int8Kind.name`` of the one int8 table (:mod:`lightning_compress.core.quant.table`):
a new int8 layer type becomes exportable with one :func:`register_exporter` call. An int8 layer
whose kind has no exporter is an error that names the layer, raised before the model is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from lightning_compress.core.quant.modules import Int8Module
from lightning_compress.core.quant.table import int8_kind_of
from lightning_compress.export.forms import ExportConv2d, ExportEmbedding, ExportLinear, ExportOptions
from lightning_compress.export.forms_attention import export_inproj_attention

__all__ = ["EXPORTERS", "UnsupportedLayerError", "export_forms", "form_of", "register_exporter"]

Exporter = Callable[[nn.Module, ExportOptions], nn.Module]

EXPORTERS: dict[str, Exporter] = {}
"""``{Int8Kind.name: build the export form of a layer of that kind}``."""


class UnsupportedLayerError(ValueError):
    """An int8 layer of the model has no ONNX exporter."""


def register_exporter(kind_name: str, exporter: Exporter) -> Exporter:
    """Export the int8 layers of kind ``kind_name`` through ``exporter(layer, options)``; returns it."""
    EXPORTERS[kind_name] = exporter
    return exporter


register_exporter("Int8Linear", ExportLinear)
register_exporter("Int8Conv2d", ExportConv2d)
register_exporter("Int8Conv1D", ExportLinear)  # Hugging Face Conv1D: an Int8Linear with its [out, in] int8 weight
register_exporter("Int8Embedding", ExportEmbedding)
register_exporter("Int8InProjMultiheadAttention", export_inproj_attention)


def _is_int8_layer(module: nn.Module) -> bool:
    return isinstance(module, Int8Module) or int8_kind_of(module) is not None


def form_of(name: str, layer: nn.Module, options: ExportOptions, missing_ok: bool = False) -> nn.Module:
    """The export form of ``layer`` (named ``name`` in errors); ``missing_ok``: a float layer is returned as is."""
    if missing_ok and not _is_int8_layer(layer):
        return layer
    kind = int8_kind_of(layer)
    exporter = None if kind is None else EXPORTERS.get(kind.name)
    if exporter is None:
        kind_name = type(layer).__name__ if kind is None else kind.name
        raise UnsupportedLayerError(
            f"Cannot export the int8 layer `{name or '<root>'}` ({type(layer).__name__}, kind {kind_name!r}) to ONNX:"
            f" no exporter is registered for it (exportable kinds: {sorted(EXPORTERS)}). Leave it float with"
            f" `exclude=[{name!r}]` or register one with `lightning_compress.export.registry.register_exporter`."
        )
    return exporter(layer, options)


@contextmanager
def export_forms(model: nn.Module, options: ExportOptions) -> Iterator[nn.Module]:
    """Swap every int8 layer of ``model`` for its export form for the duration of the block.

    Yields the model to export (the root's export form when ``model`` itself is an int8 layer).
    Every form is built before the first swap (so an unsupported layer leaves the model untouched),
    a layer shared by several parents gets one form, and the original layers are put back on exit,
    on error too.
    """
    if _is_int8_layer(model):
        yield form_of("", model, options)
        return
    forms: dict[int, nn.Module] = {}
    places: list[tuple[nn.Module, str, nn.Module]] = []
    seen_parents: set[int] = set()

    def visit(parent: nn.Module, prefix: str) -> None:
        if id(parent) in seen_parents:
            return
        seen_parents.add(id(parent))
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if _is_int8_layer(child):  # its own children go with it
                if id(child) not in forms:
                    forms[id(child)] = form_of(name, child, options)
                places.append((parent, attr, child))
            else:
                visit(child, name)

    visit(model, "")
    try:
        for parent, attr, child in places:
            parent._modules[attr] = forms[id(child)]
        yield model
    finally:
        for parent, attr, child in reversed(places):
            parent._modules[attr] = child
