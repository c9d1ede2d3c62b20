"""Example inputs of an export: a tensor, a tuple of positional inputs or a dict of keyword inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree

from lightning_compress.errors import config_error

__all__ = ["batch_dynamic_shapes", "ort_feed", "split_inputs"]


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the call ``model(*args, **kwargs)`` that ``example_inputs`` stands for."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple) and example_inputs:
        return example_inputs, {}
    if isinstance(example_inputs, list) and example_inputs:
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping) and example_inputs and all(isinstance(k, str) for k in example_inputs):
        return (), dict(example_inputs)
    raise config_error(
        "example_inputs",
        "a tensor, a non-empty tuple of positional inputs or a non-empty dict of keyword inputs",
        type(example_inputs).__name__ if not isinstance(example_inputs, (tuple, list, dict)) else example_inputs,
    )


def _leaves(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    return [t for t in _pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]


def batch_dynamic_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export``: dimension 0 of every tensor input is one shared ``batch``.

    Raises:
        CompressionConfigError: the tensors disagree on their first dimension, or it is 1 (which
            ``torch.export`` would fix to 1: give at least two examples).
    """
    tensors = [t for t in _leaves(args, kwargs) if t.dim() > 0]
    sizes = sorted({int(t.shape[0]) for t in tensors})
    if len(sizes) > 1:
        raise config_error(
            "example_inputs", "tensors that share their first (batch) dimension", f"first dimensions {sizes}"
        )
    if sizes == [1]:
        raise config_error(
            "example_inputs",
            "a batch of at least 2 examples (a batch of 1 fixes the batch dimension of the exported graph to 1)",
            "a batch of 1",
        )
    batch = torch.export.Dim("batch")

    def spec(x: Any) -> Any:
        return {0: batch} if isinstance(x, Tensor) and x.dim() > 0 else None

    if kwargs:
        return {key: _pytree.tree_map(spec, value) for key, value in kwargs.items()}
    return tuple(_pytree.tree_map(spec, a) for a in args)


def ort_feed(input_names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The ONNX Runtime feed for the same inputs: tensors in graph-input order (keyword inputs by name)."""
    tensors = _leaves(args, kwargs) if not kwargs else [t for t in _leaves((), kwargs)]
    arrays = [t.detach().cpu().numpy() for t in tensors]
    if kwargs and set(input_names) <= set(kwargs):
        return {name: kwargs[name].detach().cpu().numpy() for name in input_names}
    return dict(zip(input_names, arrays, strict=False))
