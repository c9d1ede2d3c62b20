"""The checks of an artifact before loading: its structure and version, then the whole file against the model.

Nothing here allocates what the file sizes or changes the model: ``_read`` checks the top-level
table (tensors memory-mapped, not read), ``_plan`` checks every layer entry, key, shape, dtype and
packed entry against the model and says what loading will change (a ``_Plan``). Every problem is
gathered by a ``_Refusal`` and raised as one ``ValueError`` naming the file and the entries.
:func:`~lightning_compress.core.serialize.load_compressed` applies the plan.

Pure torch.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.packing import unpack_bits
from lightning_compress.core.quant.modules import MODES, Int8Module
from lightning_compress.core.quant.table import int8_kind_named

__all__ = ["FORMAT", "FORMAT_VERSION"]  # the rest is read by core/serialize.py


FORMAT = "lightning-compress"
"""The ``"format"`` entry of every artifact."""

FORMAT_VERSION = 1
"""The ``"format_version"`` this release writes and reads."""

SHAPES_ENTRY = "shapes"
"""The optional entry of channel-removed models (their shrunk weight shapes, by layer name)."""

_VERSIONS_WRITTEN = (1,)
"""Every ``format_version`` a lightning-compress release has written (and so the only ones it reads)."""

_REQUIRED_ENTRIES = ("format", "format_version", "layers", "tensors", "packed")
FOLDED_ENTRY = "folded"
"""The optional entry of models whose batch norms were folded into their convolutions (``core/quant/fold.py``)."""

INPUT_GRIDS_ENTRY = "input_grids"
"""``{block name: convolution path}``: residual blocks whose input is put on that convolution's grid."""
_OPTIONAL_ENTRIES = ("torch_version", SHAPES_ENTRY, FOLDED_ENTRY, INPUT_GRIDS_ENTRY)
_LAYER_KEYS = frozenset({"kind", "mode", "per_channel"})
_PACKED_KEYS = frozenset({"mask", "values", "shape"})
_MAX_LISTED = 8
_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 6
_BRIEF.maxlevel = 3


def _brief(value: Any) -> str:
    """A short description of a value read from a file (never its whole repr: it may be large or deep)."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return _BRIEF.repr(value)


class _Refusal:
    """What is wrong with an artifact, gathered entry by entry, raised as one ``ValueError``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []

    def add(self, entry: str, what: str) -> None:
        self.problems.append(f"{entry}: {what}")

    def error(self, intro: str) -> ValueError:
        listed = "; ".join(self.problems[:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        listed += f"; and {more} more" if more > 0 else ""
        return ValueError(f"Refused to load {self.path!r}: {intro}: {listed}. The model was not changed.")

    def raise_if_any(self, intro: str) -> None:
        if self.problems:
            raise self.error(intro)


def _read(path: str) -> dict[str, Any]:
    """The artifact's top-level table, its structure and version checked; tensors are memory-mapped, not read."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"Refused to load {path!r}: the file is empty (0 bytes), not an artifact.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refused to load {path!r}: it holds objects other than plain tensors, numbers and strings, which"
            f" `torch.load(weights_only=True)` will not unpickle. It is not an artifact written by"
            f" `save_compressed`. ({err})"
        ) from err
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # a truncated or damaged zip, a record of the wrong size, ...
        raise ValueError(
            f"Refused to load {path!r}: the file is damaged or truncated (or not written by `torch.save`):"
            f" {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        ) from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(
            f"Refused to load {path!r}: it is not a lightning-compress artifact (no 'format': {FORMAT!r} entry)."
        )
    version = obj.get("format_version")
    if type(version) is int and version > max(_VERSIONS_WRITTEN):
        raise ValueError(
            f"Refused to load {path!r}: it has artifact format version {version}; this lightning-compress reads"
            f" versions up to {FORMAT_VERSION}. Upgrade lightning-compress to load it."
        )
    if type(version) is not int or version not in _VERSIONS_WRITTEN:
        raise ValueError(
            f"Refused to load {path!r}: entry 'format_version' is {_brief(version)}, which no lightning-compress"
            f" ever wrote (versions written: {', '.join(map(str, _VERSIONS_WRITTEN))})."
        )
    refusal = _Refusal(path)
    for key in obj:
        if key not in _REQUIRED_ENTRIES and key not in _OPTIONAL_ENTRIES:
            refusal.add(f"entry {_brief(key)}", f"not part of format version {version}")
    for key in _REQUIRED_ENTRIES:
        if key not in obj:
            refusal.add(f"entry {key!r}", "missing")
    for key in ("layers", "tensors", "packed"):
        if key in obj and not isinstance(obj[key], dict):
            refusal.add(f"entry {key!r}", f"expected a table (dict), got {_brief(obj[key])}")
        elif key in obj and not all(isinstance(k, str) for k in obj[key]):
            bad = next(k for k in obj[key] if not isinstance(k, str))
            refusal.add(f"entry {key!r}", f"expected names (strings) as keys, got {_brief(bad)}")
    if "torch_version" in obj and not isinstance(obj["torch_version"], str):
        refusal.add("entry 'torch_version'", f"expected a string, got {_brief(obj['torch_version'])}")
    refusal.raise_if_any("the artifact is malformed")
    return obj


@dataclass
class _Plan:
    """What loading will do to the model, found without changing it."""

    convert: list[tuple[str, type[Int8Module], nn.Module, str, bool]] = field(default_factory=list)
    configure: list[tuple[Int8Module, str, bool]] = field(default_factory=list)
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    defaults: dict[str, Tensor] = field(default_factory=dict)
    """State the artifact may lack, and its value then (see :data:`_ADDED_LATER`)."""


_ADDED_LATER: dict[str, tuple[str, ...]] = {"Int8Conv2d": ("input_scale", "output_scale")}
"""Buffers a static layer of this kind gained after artifacts of it were written. An artifact
without them loads with 0 there (a scale of 0 leaves that activation in float: what the layer
computed when the artifact was written)."""


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the meta device (no memory for them)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _layer_state(
    current: nn.Module, int8_type: type[Int8Module], mode: str, per_channel: bool
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the state of ``current`` once it is an int8 layer of this configuration."""
    with torch.device("meta"):
        if isinstance(current, Int8Module):
            layer = _meta_copy(current)
            assert isinstance(layer, Int8Module)
            layer.configure(mode, per_channel)
        else:
            placeholder = torch.ones(()) if mode == "static" else None
            layer = int8_type.from_float(_meta_copy(current), mode, per_channel, placeholder)
    return {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()}


def _plan_layers(module: nn.Module, layers: Mapping[str, Any], refusal: _Refusal) -> _Plan:
    plan = _Plan(expected={k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()})
    for name, meta in layers.items():
        entry = f"layers[{name!r}]"
        if not isinstance(meta, dict) or set(meta) != _LAYER_KEYS:
            refusal.add(entry, f"expected a table with the keys 'kind', 'mode' and 'per_channel', got {_brief(meta)}")
            continue
        kind, mode, per_channel = meta["kind"], meta["mode"], meta["per_channel"]
        table_entry = int8_kind_named(kind) if isinstance(kind, str) else None
        if table_entry is None:
            refusal.add(entry, f"unknown layer kind {_brief(kind)}")
            continue
        if not isinstance(mode, str) or mode not in MODES:
            refusal.add(entry, f"unknown mode {_brief(mode)} (one of {', '.join(map(repr, MODES))})")
            continue
        if type(per_channel) is not int or per_channel not in (0, 1):
            refusal.add(entry, f"'per_channel' must be 0 or 1, got {_brief(per_channel)}")
            continue
        try:
            current = module.get_submodule(name)
        except AttributeError:
            refusal.add(entry, "the model has no such module")
            continue
        float_type, int8_type = table_entry.float_type, table_entry.int8_type
        if not isinstance(current, (float_type, int8_type)):
            refusal.add(entry, f"the artifact has an {kind}, the model a {type(current).__name__}")
            continue
        if not name and not isinstance(current, Int8Module):
            refusal.add(entry, f"the artifact stores the model itself as an {kind}: load it into an int8 model")
            continue
        prefix = f"{name}." if name else ""
        for key in current.state_dict():
            plan.expected.pop(prefix + key, None)
        plan.expected.update(
            {prefix + k: v for k, v in _layer_state(current, int8_type, mode, bool(per_channel)).items()}
        )
        if mode == "static":
            plan.defaults.update({prefix + k: torch.zeros(()) for k in _ADDED_LATER.get(kind, ())})
        if isinstance(current, Int8Module):
            plan.configure.append((current, mode, bool(per_channel)))
        else:
            plan.convert.append((name, int8_type, current, mode, bool(per_channel)))
    return plan


def _plain_tensor(value: Any) -> bool:
    return (
        type(value) in (Tensor, nn.Parameter)
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.is_quantized
    )


def _describe(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return f"{shape} {dtype}"


def _check_packed(key: str, entry: Any, want: tuple[tuple[int, ...], torch.dtype], refusal: _Refusal) -> None:
    """A packed entry against the model's tensor: the declared shape first, so nothing is sized by the file."""
    where = f"packed[{key!r}]"
    if not isinstance(entry, dict) or set(entry) != _PACKED_KEYS:
        refusal.add(where, f"expected a table with the keys 'mask', 'values' and 'shape', got {_brief(entry)}")
        return
    shape, mask, values = entry["shape"], entry["mask"], entry["values"]
    if not isinstance(shape, (list, tuple)) or not all(type(s) is int and s >= 0 for s in shape):
        refusal.add(f"{where}['shape']", f"expected a list of non-negative integers, got {_brief(shape)}")
        return
    want_shape, want_dtype = want
    if tuple(shape) != want_shape:
        refusal.add(f"{where}['shape']", f"{tuple(shape)}, the model's tensor is {want_shape}")
        return
    numel = math.prod(want_shape)
    if not _plain_tensor(mask) or mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != -(-numel // 8):
        refusal.add(f"{where}['mask']", f"expected a 1-d uint8 tensor of {-(-numel // 8)} bytes, got {_brief(mask)}")
        return
    if not _plain_tensor(values) or values.dim() != 1 or values.dtype != want_dtype:
        refusal.add(f"{where}['values']", f"expected a 1-d {want_dtype} tensor, got {_brief(values)}")
        return
    bits = unpack_bits(mask, mask.numel() * 8)
    if bool(bits[numel:].any()):
        refusal.add(f"{where}['mask']", f"bits set beyond the tensor's {numel} entries")
        return
    count = int(bits.sum())
    if count != values.numel():
        refusal.add(
            f"{where}['values']", f"the mask marks {count} nonzero entries, but there are {values.numel()} values"
        )


def _check_state(obj: Mapping[str, Any], plan: _Plan, refusal: _Refusal) -> None:
    tensors: Mapping[str, Any] = obj["tensors"]
    packed: Mapping[str, Any] = obj["packed"]
    expected = plan.expected
    twice = sorted(set(tensors) & set(packed))
    if twice:
        refusal.add("tensors/packed", f"{len(twice)} key(s) stored twice: {twice[:_MAX_LISTED]}")
    stored = set(tensors) | set(packed)
    for label, items in (
        ("missing in the artifact", sorted(set(expected) - stored - set(plan.defaults))),
        ("not in the model", sorted(stored - set(expected))),
    ):
        if items:
            more = " ..." if len(items) > _MAX_LISTED else ""
            refusal.add("tensors/packed", f"{len(items)} key(s) {label}: {items[:_MAX_LISTED]}{more}")
    for key, value in tensors.items():
        if key not in expected:
            continue
        if not _plain_tensor(value):
            refusal.add(f"tensors[{key!r}]", f"expected a dense CPU tensor, got {_brief(value)}")
        elif (tuple(value.shape), value.dtype) != expected[key]:
            got = _describe(tuple(value.shape), value.dtype)
            refusal.add(
                f"tensors[{key!r}]", f"another shape or dtype: artifact {got}, model {_describe(*expected[key])}"
            )
    for key, entry in packed.items():
        if key in expected:
            _check_packed(key, entry, expected[key], refusal)


def _check_shapes(obj: Mapping[str, Any], module: nn.Module, refusal: _Refusal) -> None:
    """Hook for the ``"shapes"`` entry of channel-removed models: ``{layer name: [int, ...]}``.

    Each name must be a module of the model with a ``weight``, each shape a list of positive
    integers of the same length as that weight's, no dimension larger than the model's.
    """
    if SHAPES_ENTRY not in obj:
        return
    shapes = obj[SHAPES_ENTRY]
    if not isinstance(shapes, dict):
        refusal.add(f"entry {SHAPES_ENTRY!r}", f"expected a table (dict), got {_brief(shapes)}")
        return
    for name, shape in shapes.items():
        where = f"{SHAPES_ENTRY}[{_brief(name)}]"
        if not isinstance(name, str):
            refusal.add(where, "expected a layer name (a string)")
            continue
        if not isinstance(shape, (list, tuple)) or not all(type(s) is int and s > 0 for s in shape):
            refusal.add(where, f"expected a list of positive integers, got {_brief(shape)}")
            continue
        try:
            weight = module.get_submodule(name).weight
        except AttributeError:
            refusal.add(where, "the model has no such module with a weight")
            continue
        if (
            not isinstance(weight, Tensor)
            or weight.dim() != len(shape)
            or any(s > m for s, m in zip(shape, weight.shape, strict=True))
        ):
            model_shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            refusal.add(where, f"{tuple(shape)} does not fit in the model's weight {model_shape}")


def _plan(obj: Mapping[str, Any], module: nn.Module, path: str) -> _Plan:
    """Check the whole artifact against ``module`` and say what loading will change; raise if anything is off."""
    refusal = _Refusal(path)
    _check_shapes(obj, module, refusal)
    plan = _plan_layers(module, obj["layers"], refusal)
    refusal.raise_if_any("the artifact does not match the model")
    _check_state(obj, plan, refusal)
    refusal.raise_if_any("the artifact does not match the model")
    return plan
