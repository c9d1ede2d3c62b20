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
    }

Int8 weights are stored as int8 with their float32 scales. A tensor with enough exact zeros is
*packed* when that is smaller: a bitmask of its nonzero entries (8 per byte, the first entry in the
lowest bit) plus the nonzero values in order. A 90 % sparse int8 weight then costs
:math:`1/8 + 0.1` bytes per entry instead of 1. Zeros are recognised bit-exactly (a float ``-0.0``
is kept as a value), so loading gives back exactly the tensors that were saved.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.quant.convert import int8_layers
from lightning_compress.core.quant.modules import MODES, Int8Module
from lightning_compress.core.quant.table import int8_kind_named, int8_kind_of
from lightning_compress.core.quant.transformer import adapt_parents

__all__ = ["FORMAT", "FORMAT_VERSION", "load_compressed", "pack_bits", "save_compressed", "unpack_bits"]

FORMAT = "lightning-compress"
"""The ``"format"`` entry of every artifact."""

FORMAT_VERSION = 1
"""The ``"format_version"`` this release writes and reads."""

_PACK_OVERHEAD = 128  # bytes a second stored tensor costs in the zip container, roughly


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into ``uint8``, 8 entries per byte (flattened; entry ``i`` in bit ``i % 8``).

    Example:
        >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True]))
        tensor([13,  1], dtype=torch.uint8)
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` flags as a flat bool tensor.

    Example:
        >>> unpack_bits(torch.tensor([13, 1], dtype=torch.uint8), 9).tolist()
        [True, False, True, True, False, False, False, False, True]
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def _nonzero_mask(t: Tensor) -> Tensor:
    mask = t != 0
    if t.is_floating_point():
        mask |= torch.signbit(t)  # keep -0.0 as a value, so the round trip is bit-exact
    return mask


def _compact(t: Tensor) -> Tensor:
    """The tensor on the CPU, owning exactly its own bytes (``torch.save`` writes a view's whole storage)."""
    t = t.detach().cpu()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _encode(t: Tensor) -> tuple[str, Any]:
    t = _compact(t)
    dense = t.numel() * t.element_size()
    if t.numel() < 64 or t.dtype == torch.bool:
        return "tensors", t
    mask = _nonzero_mask(t)
    nnz = int(mask.sum())
    packed = math.ceil(t.numel() / 8) + nnz * t.element_size()
    if packed + _PACK_OVERHEAD >= dense:
        return "tensors", t
    return "packed", {
        "mask": pack_bits(mask),
        "values": t.reshape(-1)[mask.reshape(-1)].clone(),
        "shape": list(t.shape),
    }


def _decode(entry: Mapping[str, Any], key: str) -> Tensor:
    try:
        shape = [int(s) for s in entry["shape"]]
        values: Tensor = entry["values"]
        numel = math.prod(shape)
        mask = unpack_bits(entry["mask"], numel)
        out = torch.zeros(numel, dtype=values.dtype)
        out[mask] = values
    except (KeyError, TypeError, RuntimeError, IndexError) as err:
        raise ValueError(f"The packed tensor {key!r} of the artifact is malformed: {err}") from err
    return out.reshape(shape)


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
    for key, value in module.state_dict().items():
        where, encoded = _encode(value)
        (tensors if where == "tensors" else packed)[key] = encoded
    artifact = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "layers": _layer_meta(module),
        "tensors": tensors,
        "packed": packed,
    }
    atomic_torch_save(artifact, Path(path))


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refused to load {os.fspath(path)!r}: it holds objects other than plain tensors, numbers and"
            f" strings, which `torch.load(weights_only=True)` will not unpickle. It is not an artifact written"
            f" by `save_compressed`. ({err})"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a lightning-compress artifact (no format {FORMAT!r} entry).")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has artifact format version {version!r}; this lightning-compress reads"
            f" versions up to {FORMAT_VERSION}. Upgrade lightning-compress to load it."
        )
    return obj


def _state_from(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = dict(obj.get("tensors", {}))
    for key, entry in obj.get("packed", {}).items():
        state[key] = _decode(entry, key)
    return state


def _prepare_layers(module: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    """Make every layer the artifact stores as int8 an int8 layer of the same configuration."""
    problems: list[str] = []
    plan: list[tuple[str, type[Int8Module], nn.Module, str, bool]] = []
    for name, meta in layers.items():
        kind, mode, per_channel = meta.get("kind"), meta.get("mode"), bool(meta.get("per_channel", 1))
        entry = int8_kind_named(kind) if isinstance(kind, str) else None
        if entry is None or mode not in MODES:
            problems.append(f"`{name}`: unknown layer kind {kind!r} or mode {mode!r}")
            continue
        float_type, int8_type = entry.float_type, entry.int8_type
        try:
            current = module.get_submodule(name)
        except AttributeError:
            problems.append(f"`{name}`: the model has no such module")
            continue
        if not isinstance(current, (float_type, int8_type)):
            problems.append(f"`{name}`: the artifact has a {kind}, the model a {type(current).__name__}")
            continue
        plan.append((name, int8_type, current, mode, per_channel))
    if problems:
        raise ValueError("The artifact does not match the model: " + "; ".join(problems) + ".")
    for name, int8_type, current, mode, per_channel in plan:
        if isinstance(current, Int8Module):
            current.configure(mode, per_channel)
            continue
        placeholder = torch.ones(()) if mode == "static" else None
        new = int8_type.from_float(current, mode, per_channel, placeholder)  # type: ignore[attr-defined]
        new.train(current.training)
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
    adapt_parents(module)


def _check_state(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: artifact {tuple(state[k].shape)} {state[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in state and (state[k].shape != v.shape or state[k].dtype != v.dtype)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing in the artifact", missing), ("not in the model", unexpected)):
            if items:
                parts.append(f"{len(items)} key(s) {label}: {items[:8]}{' ...' if len(items) > 8 else ''}")
        if mismatched:
            parts.append(f"{len(mismatched)} tensor(s) of another shape or dtype: {mismatched[:8]}")
        raise ValueError("The artifact does not match the model: " + "; ".join(parts) + ".")


@torch.no_grad()
def load_compressed(path: str | os.PathLike[str], module: nn.Module) -> nn.Module:
    """Restore an artifact of :func:`save_compressed` into ``module`` and return it.

    ``module`` may be a freshly built float model (its layers that the artifact stores as int8 are
    converted first) or an int8 one. Keys are checked strictly, so the outputs are exactly those of
    the model that was saved. The file is read with ``torch.load(weights_only=True)``.

    Args:
        path: the artifact.
        module: a model of the same architecture.

    Returns:
        ``module``, now holding the artifact's weights (int8 layers where the artifact has them).

    Raises:
        ValueError: the file is not an artifact (or holds anything but plain data), was written by a
            newer format version, or does not match ``module`` (missing or unexpected keys, other
            shapes or dtypes, layers the model does not have).
    """
    obj = _read(path)
    state = _state_from(obj)
    _prepare_layers(module, obj.get("layers", {}))
    _check_state(module, state)
    module.load_state_dict(state, strict=True)
    return module
