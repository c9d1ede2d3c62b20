"""Helpers of :class:`~lightning_compress.DistillationModule`: teacher weights, feature names, a probe batch."""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress._lightning_compat import data_source
from lightning_compress.core.batches import first_loader
from lightning_compress.errors import CompressionConfigError, config_error

# Where checkpoints written by common tools keep the weights, in the order they are tried.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_teacher_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors of a Lightning checkpoint (its ``state_dict``) or of a plain state dict file.

    Loaded on the CPU with ``torch.load(weights_only=True)``: no code in the file runs.
    """
    if not os.path.isfile(path):
        raise config_error("teacher_checkpoint", "the path of a checkpoint file", str(path), "No such file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise config_error(
            "teacher_checkpoint",
            "a checkpoint that torch.load(weights_only=True) can read",
            str(path),
            f"It could not be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            " Save the teacher's weights with torch.save(teacher.state_dict(), path).",
        ) from err
    state = _find_state_dict(obj)
    if state is None:
        keys = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise config_error(
            "teacher_checkpoint",
            "a Lightning checkpoint or a state dict of tensors",
            str(path),
            f"It holds {keys}, with no state dict under any of {list(_STATE_DICT_KEYS)}.",
        )
    return state


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _find_state_dict(obj: Any) -> dict[str, Tensor] | None:
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
    return dict(obj) if _is_state_dict(obj) else None


def _prefix_coverage(checkpoint_keys: Iterable[str], expected: set[str]) -> dict[str, int]:
    """For every prefix ``p`` such that ``p + key`` is a checkpoint key for an expected ``key``: how many."""
    coverage: dict[str, int] = {}
    for key in checkpoint_keys:
        cut = 0
        while True:
            if key[cut:] in expected:
                coverage[key[:cut]] = coverage.get(key[:cut], 0) + 1
            dot = key.find(".", cut)
            if dot < 0:
                break
            cut = dot + 1
    return coverage


def load_teacher_weights(teacher: nn.Module, state: Mapping[str, Tensor], source: str) -> str:
    """Copy ``state`` into ``teacher`` with strict key matching, stripping the prefix the keys carry.

    A Lightning checkpoint keeps the teacher's weights under the name of the attribute that held
    it (``model.``, ``backbone.``, ``student.``, ``module.`` from DDP, ``_orig_mod.`` from
    ``torch.compile``...). The prefix is the one under which every key of the teacher is present;
    the empty prefix wins a tie, any other tie is an error.

    Returns:
        The prefix that was stripped (``""`` for none).

    Raises:
        CompressionConfigError: if no prefix holds all of the teacher's keys, if several do, or if
            the tensors under the prefix do not load with ``strict=True`` (extra keys, shapes).
    """
    expected = set(teacher.state_dict())
    if not expected:
        return ""
    coverage = _prefix_coverage(state, expected)
    complete = sorted(p for p, n in coverage.items() if n == len(expected))
    where = f"`teacher_checkpoint` ({source!r})"
    if not complete:
        best = max(coverage, key=lambda p: coverage[p], default="")
        missing = sorted(k for k in expected if best + k not in state)
        raise CompressionConfigError(
            f"Expected {where} to hold every weight of the teacher ({type(teacher).__name__}, {len(expected)}"
            f" tensors), but {len(missing)} are missing, e.g. {missing[:3]} (best prefix {best!r} matched"
            f" {coverage.get(best, 0)}). The checkpoint's keys look like {sorted(state)[:4]}."
        )
    if "" in complete:
        prefix = ""
    elif len(complete) == 1:
        prefix = complete[0]
    else:
        raise CompressionConfigError(
            f"Expected {where} to hold the teacher's weights under one prefix, but they are complete under each of"
            f" {complete}. Save the teacher's own state dict: torch.save(teacher.state_dict(), path)."
        )
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        teacher.load_state_dict(sub, strict=True)
    except RuntimeError as err:
        raise CompressionConfigError(
            f"Expected {where} to load into the teacher ({type(teacher).__name__}) with strict=True after removing"
            f" the prefix {prefix!r}, but it did not: {' '.join(str(err).split())}"
        ) from err
    return prefix


def strip_role(name: str, role: str) -> str:
    """``"student.layer1"`` -> ``"layer1"``; a name without the prefix is returned as it is."""
    return name[len(role) + 1 :] if name.startswith(role + ".") else ("" if name == role else name)


def resolve_module(root: nn.Module, name: str, role: str) -> nn.Module:
    """The submodule of ``root`` (the student or the teacher) named ``name`` (with or without ``role.``).

    Raises:
        CompressionConfigError: if it does not exist, with the closest names in the message.
    """
    relative = strip_role(name, role)
    try:
        return root.get_submodule(relative)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        close = [f"{role}.{n}" for n in difflib.get_close_matches(relative, names, n=3)]
        hint = f"Close matches: {close}." if close else f"The {role} has e.g. {[f'{role}.{n}' for n in names[:5]]}."
        raise config_error(
            "feature_pairs", f"names of submodules of the {role}", name, f"It has no submodule {name!r}. {hint}"
        ) from None


@dataclass(frozen=True)
class FeaturePair:
    """One hint: a student submodule matched to a teacher submodule, names relative to each."""

    student: str
    teacher: str
    key: str  # name of its projection in the ModuleDict (no dots)


def resolve_feature_pairs(pairs: Mapping[str, str] | None, student: nn.Module, teacher: nn.Module) -> list[FeaturePair]:
    """Check ``feature_pairs`` against the two models and name a projection for each pair."""
    if pairs is None:
        return []
    if not isinstance(pairs, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
        raise config_error("feature_pairs", "a dict from student to teacher submodule names", pairs)
    resolved, keys = [], set()
    for s_name, t_name in pairs.items():
        resolve_module(student, s_name, "student")
        resolve_module(teacher, t_name, "teacher")
        s_rel, t_rel = strip_role(s_name, "student"), strip_role(t_name, "teacher")
        key = (s_rel or "output").replace(".", "__")
        if key in keys:
            raise config_error("feature_pairs", "one entry per student submodule", pairs, f"{s_name!r} repeats.")
        keys.add(key)
        resolved.append(FeaturePair(s_rel, t_rel, key))
    return resolved


def probe_batch(trainer: pl.Trainer, stage: str) -> Any:
    """The first batch of the dataloader the trainer is about to run for ``stage`` (on the CPU)."""
    source = data_source(trainer, stage)
    if source is None or source.instance is None or not source.is_defined():
        raise CompressionConfigError(
            f"Expected a {stage} dataloader to take one batch from at setup, but there is none. Pass"
            " dataloaders to the trainer, or set `example_input_array` on the DistillationModule."
        )
    given: Any = source.dataloader()
    loaders = first_loader(given)
    if loaders is None:
        raise CompressionConfigError(f"Expected the {stage} dataloader to be iterable, but got {type(given)}.")
    # A fresh iterator; the global random state is restored by the caller.
    return next(iter(loaders))
