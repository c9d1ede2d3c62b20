"""``save_compressed`` / ``load_compressed``: one small, safe file per compressed model.

The artifact is a plain dict written with ``torch.save`` and read with
``torch.load(weights_only=True)``, so loading a file from the internet cannot run code::

    {
        "format": "lightning-compress",
        "format_version": 1,
        "torch_version": "2.x",
        "layers": {name: {"kind": "Int8Linear" | "Int8Conv2d", "mode": str, "per_channel": 0 | 1}},
        "tensors": {state_dict key: tensor},                      # stored as they are
        "packed": {state_dict key: {"mask": uint8, "values": tensor, "shape": [int, ...]}},
        "shapes": {layer name: [int, ...]},                      # optional: a channel-removed model
        "folded": {batch norm name: convolution name},            # optional: batch norms folded away
        "input_grids": {block name: convolution path},            # optional: residual inputs on a grid
    }

Int8 weights are stored as int8 with their float32 scales. A tensor with enough exact zeros is
*packed* when that is smaller: a bitmask of its nonzero entries (8 per byte, the first entry in the
lowest bit) plus the nonzero values in order. A 90 % sparse int8 weight then costs
:math:`1/8 + 0.1` bytes per entry instead of 1. A float ``-0.0`` counts as a zero (pruned weights are
``+0.0``; it loads as ``+0.0``), every other value comes back bit-exactly.

Loading checks the whole file against the model before it allocates anything the file sizes or
changes the model (see :func:`load_compressed` and the *Safety* page of the docs).

Where the pieces live: the packing in :mod:`~lightning_compress.core.packing`, the checks (and the
format's name and version) in :mod:`~lightning_compress.core.artifact_checks`; this module writes
the artifact and applies a checked one to the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.artifact_checks import FOLDED_ENTRY, INPUT_GRIDS_ENTRY, SHAPES_ENTRY, _Plan, _plan, _read

# Their old home: FORMAT, FORMAT_VERSION, pack_bits and unpack_bits are imported from here (explicit re-exports,
# not in __all__: they belong to artifact_checks and packing).
from lightning_compress.core.artifact_checks import FORMAT as FORMAT
from lightning_compress.core.artifact_checks import FORMAT_VERSION as FORMAT_VERSION
from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.packing import _decode, _encode
from lightning_compress.core.packing import pack_bits as pack_bits
from lightning_compress.core.packing import unpack_bits as unpack_bits
from lightning_compress.core.prune.slim_io import apply_slim_shapes, check_slim_shapes, slim_shapes
from lightning_compress.core.quant.convert import int8_layers, tie_int8_weights, tied_weight_groups
from lightning_compress.core.quant.fold import check_folded, folded_batch_norms, restore_folded
from lightning_compress.core.quant.residual import check_input_grids, input_grids, put_input_grids
from lightning_compress.core.quant.table import int8_kind_of
from lightning_compress.core.quant.transformer import adapt_parents

__all__ = ["load_compressed", "save_compressed"]


def _identity(t: Tensor) -> tuple[Any, ...]:
    """Equal for two tensors that are views of the same memory with the same shape, strides and dtype."""
    where: tuple[Any, ...]
    try:
        where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset())
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor without plain storage (a subclass)
        where = (id(t),)
    return (*where, tuple(t.shape), t.stride(), t.dtype)


def _layer_meta(module: nn.Module) -> dict[str, dict[str, Any]]:
    meta = {}
    for name, layer in int8_layers(module).items():
        kind = int8_kind_of(layer)
        if kind is None:  # a subclass of an int8 type that the table does not know
            raise TypeError(f"`{name}` is a {type(layer).__name__}, which the int8 table has no entry for.")
        meta[name] = {"kind": kind.name, "mode": layer.mode, "per_channel": int(layer.per_channel)}
    return meta


@torch.no_grad()
def save_compressed(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``module`` (float, pruned or int8) to one artifact file, atomically.

    Int8 layers keep their int8 weights and float32 scales; any tensor whose exact zeros make the
    bitmask-plus-values form smaller is packed. The file is first written under a temporary name
    in the same folder and then renamed over ``path``, so an existing file is never half-written.

    Args:
        module: the model; its whole ``state_dict`` is written (non-persistent buffers are not).
        path: the file to write.

    Example:
        >>> import tempfile, os
        >>> from lightning_compress.core.quant.convert import quantizable_targets, quantize_model
        >>> model = nn.Sequential(nn.Linear(64, 64))
        >>> _ = quantize_model(model, quantizable_targets(model)[0])
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> save_compressed(model, path)
        >>> fresh = nn.Sequential(nn.Linear(64, 64))
        >>> x = torch.randn(3, 64)
        >>> torch.equal(load_compressed(path, fresh)(x), model(x))
        True
    """
    tensors: dict[str, Tensor] = {}
    packed: dict[str, Any] = {}
    encodings: dict[tuple[Any, ...], tuple[str, Any]] = {}
    for key, value in module.state_dict().items():
        # A tied weight (GPT-2's lm_head and token embedding) is one tensor under two keys: encode it once
        # and store the same objects under both, so that torch.save writes its bytes once.
        identity = _identity(value)
        if identity not in encodings:
            encodings[identity] = _encode(value)
        where, encoded = encodings[identity]
        (tensors if where == "tensors" else packed)[key] = encoded
    artifact = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "layers": _layer_meta(module),
        "tensors": tensors,
        "packed": packed,
    }
    shapes = slim_shapes(module)  # layer widths of a channel-removed model (core/prune/slim_io.py)
    if shapes:
        artifact[SHAPES_ENTRY] = shapes
    folded = folded_batch_norms(module)  # batch norms folded into their convolutions (core/quant/fold.py)
    if folded:
        artifact[FOLDED_ENTRY] = folded
    grids = input_grids(module)  # residual blocks whose input is on a convolution's grid (core/quant/residual.py)
    if grids:
        artifact[INPUT_GRIDS_ENTRY] = grids
    atomic_torch_save(artifact, Path(path))


def _apply(module: nn.Module, plan: _Plan) -> None:
    tied = tied_weight_groups(module)  # float weights shared by two modules stay one int8 tensor
    for layer, mode, per_channel in plan.configure:
        layer.configure(mode, per_channel)
    for name, int8_type, current, mode, per_channel in plan.convert:
        device = next(iter(current.parameters()), torch.empty(0)).device
        placeholder = torch.ones((), device=device) if mode == "static" else None
        new = int8_type.from_float(current, mode, per_channel, placeholder)
        new.train(current.training)
        parent_name, _, child = name.rpartition(".")
        if new is not current:
            setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
    adapt_parents(module)
    tie_int8_weights(module, tied)


_Snapshot = list[tuple[nn.Module, type[nn.Module], dict[str, Any], dict[str, dict[str, Any]]]]
_TABLES = ("_modules", "_buffers", "_parameters")


def _snapshot(module: nn.Module) -> _Snapshot:
    """Enough to put the module tree back: each module's class, attributes, submodules and buffers."""
    return [(m, type(m), dict(m.__dict__), {t: dict(getattr(m, t)) for t in _TABLES}) for m in module.modules()]


def _restore(snapshot: _Snapshot) -> None:
    for m, cls, attributes, tables in snapshot:
        m.__class__ = cls
        m.__dict__.clear()
        m.__dict__.update(attributes)
        for name, table in tables.items():
            getattr(m, name).clear()
            getattr(m, name).update(table)


def _apply_entry(
    module: nn.Module,
    obj: Mapping[str, Any],
    path: str,
    entry: str,
    check: Callable[[nn.Module, Any], list[str]],
    apply: Callable[[nn.Module, Any], object],
) -> None:
    """Reshape ``module`` by an optional artifact entry, validated first (``ValueError`` naming it otherwise).

    ``"shapes"`` shrinks a channel-removed model (``core/prune/slim_io.py``); ``"folded"`` replaces its
    folded batch norms (``core/quant/fold.py``).
    """
    value = obj.get(entry) if isinstance(obj, Mapping) else None
    if value is None:
        return
    _refuse_entry(path, entry, check(module, value))
    apply(module, value)


def _refuse_entry(path: str, entry: str, problems: list[str]) -> None:
    """A ``ValueError`` naming the file and the entry when ``problems`` lists any."""
    if problems:
        raise ValueError(f"{path!r}: entry {entry!r} does not match the model: " + "; ".join(problems[:8]))


@torch.no_grad()
def load_compressed(path: str | os.PathLike[str], module: nn.Module) -> nn.Module:
    """Restore an artifact of :func:`save_compressed` into ``module`` and return it.

    ``module`` may be a freshly built float model (its layers that the artifact stores as int8 are
    converted first) or an int8 one. The file is read with ``torch.load(weights_only=True)`` (and
    memory-mapped), and the *whole* artifact is checked against ``module`` before anything is
    allocated at the size the file declares and before ``module`` is touched: its structure and
    entry types, its format version (only versions ever written), every layer entry, the keys,
    shapes and dtypes of every tensor, and for a packed tensor that its shape is the model's, that
    its mask has the right length and that it marks exactly as many entries as there are values.
    On any refusal ``module`` is exactly as it was. See the *Safety* page of the docs.

    Args:
        path: the artifact.
        module: a model of the same architecture.

    Returns:
        ``module``, now holding the artifact's weights (int8 layers where the artifact has them).

    Raises:
        ValueError: naming the file and the entry: the file is empty, truncated or damaged, holds
            anything but plain data, is not an artifact, has a format version that no release
            wrote or a newer one, is malformed, or does not match ``module`` (missing or
            unexpected keys, other shapes or dtypes, counts that disagree, layers the model does
            not have).
        FileNotFoundError: there is no such file.
    """
    where = os.fspath(path)
    obj = _read(where)
    snapshot = _snapshot(module)
    try:
        # slim layer widths first (checked, then bounded by the model's own sizes), so that the checks below
        # compare the artifact with the model it rebuilds; any refusal puts the module back as it was
        _apply_entry(module, obj, where, SHAPES_ENTRY, check_slim_shapes, apply_slim_shapes)
        # then the folded batch norms: the state below has none of theirs
        _apply_entry(module, obj, where, FOLDED_ENTRY, check_folded, restore_folded)
        plan = _plan(obj, module, where)
        # residual input grids are checked now and put on last, after the state (core/quant/residual.py)
        grids = obj.get(INPUT_GRIDS_ENTRY, {})
        _refuse_entry(where, INPUT_GRIDS_ENTRY, check_input_grids(module, grids, obj["layers"]))
    except BaseException:
        _restore(snapshot)
        raise
    state: dict[str, Tensor] = dict(obj["tensors"])
    state.update({key: _decode(entry) for key, entry in obj["packed"].items()})
    for key, value in plan.defaults.items():  # state added after the artifact was written
        state.setdefault(key, value)
    try:
        _apply(module, plan)
        module.load_state_dict(state, strict=True)
    except BaseException:
        _restore(snapshot)
        raise
    put_input_grids(module, grids, only=True)  # checked above; registering a hook cannot fail
    return module
