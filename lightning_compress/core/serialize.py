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
:math:`1/8 + 0.1` bytes per entry instead of 1. A float ``-0.0`` counts as a zero (pruned weights are
``+0.0``; it loads as ``+0.0``), every other value comes back bit-exactly.

Loading checks the whole file against the model before it allocates anything the file sizes or
changes the model (see :func:`load_compressed` and the *Safety* page of the docs).
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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.files import atomic_torch_save
from lightning_compress.core.prune.slim_io import apply_slim_shapes, check_slim_shapes, slim_shapes
from lightning_compress.core.quant.convert import int8_layers, tie_int8_weights, tied_weight_groups
from lightning_compress.core.quant.modules import MODES, Int8Module
from lightning_compress.core.quant.table import int8_kind_named, int8_kind_of
from lightning_compress.core.quant.transformer import adapt_parents

__all__ = ["FORMAT", "FORMAT_VERSION", "load_compressed", "pack_bits", "save_compressed", "unpack_bits"]

FORMAT = "lightning-compress"
"""The ``"format"`` entry of every artifact."""

FORMAT_VERSION = 1
"""The ``"format_version"`` this release writes and reads."""

SHAPES_ENTRY = "shapes"
"""The optional entry of channel-removed models (their shrunk weight shapes, by layer name)."""

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
    return t != 0  # a -0.0 is a zero (it loads as +0.0); artifacts that kept it as a value still load


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
    atomic_torch_save(artifact, Path(path))


# --- loading: every entry is checked against the model before anything is allocated or changed ---

_VERSIONS_WRITTEN = (1,)
"""Every ``format_version`` a lightning-compress release has written (and so the only ones it reads)."""

_REQUIRED_ENTRIES = ("format", "format_version", "layers", "tensors", "packed")
_OPTIONAL_ENTRIES = ("torch_version", SHAPES_ENTRY)
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
            layer = int8_type.from_float(_meta_copy(current), mode, per_channel, placeholder)  # type: ignore[attr-defined]
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
        ("missing in the artifact", sorted(set(expected) - stored)),
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


def _decode(entry: Mapping[str, Any]) -> Tensor:
    """A checked packed entry as a dense tensor (``values`` scattered where the mask has a bit)."""
    shape = [int(s) for s in entry["shape"]]
    values: Tensor = entry["values"]
    numel = math.prod(shape)
    out = torch.zeros(numel, dtype=values.dtype)
    out[unpack_bits(entry["mask"], numel)] = values
    return out.reshape(shape)


def _apply(module: nn.Module, plan: _Plan) -> None:
    tied = tied_weight_groups(module)  # float weights shared by two modules stay one int8 tensor
    for layer, mode, per_channel in plan.configure:
        layer.configure(mode, per_channel)
    for name, int8_type, current, mode, per_channel in plan.convert:
        device = next(iter(current.parameters()), torch.empty(0)).device
        placeholder = torch.ones((), device=device) if mode == "static" else None
        new = int8_type.from_float(current, mode, per_channel, placeholder)  # type: ignore[attr-defined]
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


def _apply_slim_shapes(module: nn.Module, obj: Mapping[str, Any], path: str) -> None:
    """Shrink ``module`` to the artifact's ``"shapes"`` entry (``core/prune/slim_io.py``), validated first."""
    shapes = obj.get(SHAPES_ENTRY) if isinstance(obj, Mapping) else None
    if shapes is None:
        return
    problems = check_slim_shapes(module, shapes)
    if problems:
        raise ValueError(f"{path!r}: entry {SHAPES_ENTRY!r} does not match the model: " + "; ".join(problems[:8]))
    apply_slim_shapes(module, shapes)


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
        _apply_slim_shapes(module, obj, where)
        plan = _plan(obj, module, where)
    except BaseException:
        _restore(snapshot)
        raise
    state: dict[str, Tensor] = dict(obj["tensors"])
    state.update({key: _decode(entry) for key, entry in obj["packed"].items()})
    try:
        _apply(module, plan)
        module.load_state_dict(state, strict=True)
    except BaseException:
        _restore(snapshot)
        raise
    return module
