"""What ``mode="static"`` calibrates: the ranges of the layers' inputs (and of a convolution's output).

:func:`static_input_modules` / :func:`static_output_modules` name the layers whose int8 kind
quantizes its input / its output with a calibrated scale (``Int8Kind.static_input`` /
``static_output``); :func:`record_input_ranges` / :func:`record_output_ranges` observe them with
min/max observers while a ``with`` block runs the model on calibration batches; :func:`observed_ranges`
turns the observers into the ``{name: (min, max)}`` that
:func:`~lightning_compress.core.quant.convert.quantize_model` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.quant.primitives import MinMaxObserver
from lightning_compress.core.quant.table import int8_kind_for
from lightning_compress.core.selection import Target

__all__ = [
    "observed_ranges",
    "record_input_ranges",
    "record_output_ranges",
    "static_input_modules",
    "static_output_modules",
]


@contextmanager
def record_input_ranges(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, MinMaxObserver]]:
    """Observe the min/max of each module's input while the ``with`` block runs the model.

    Forward pre-hooks are attached for the block only. A module that is never called (for example
    ``MultiheadAttention.out_proj``, whose weight the attention reads directly) keeps an observer
    with ``count == 0``.

    Example:
        >>> import torch
        >>> layer = nn.Linear(2, 2)
        >>> with record_input_ranges({"fc": layer}) as obs:
        ...     _ = layer(torch.tensor([[-1.0, 3.0]]))
        >>> obs["fc"].min_val.item(), obs["fc"].max_val.item(), obs["fc"].count
        (-1.0, 3.0, 1)
    """

    def observe(observer: MinMaxObserver) -> Any:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor):
                observer.update(args[0])

        return pre_hook

    with _observing(modules, lambda module, obs: module.register_forward_pre_hook(observe(obs))) as observers:
        yield observers


@contextmanager
def record_output_ranges(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, MinMaxObserver]]:
    """Observe the min/max of each module's (tensor) output while the ``with`` block runs the model.

    Example:
        >>> import torch
        >>> layer = nn.Conv2d(1, 1, 1, bias=False)
        >>> _ = layer.weight.data.fill_(2.0)
        >>> with record_output_ranges({"conv": layer}) as obs:
        ...     _ = layer(torch.tensor([[[[-1.0, 3.0]]]]))
        >>> obs["conv"].min_val.item(), obs["conv"].max_val.item()
        (-2.0, 6.0)
    """

    def observe(observer: MinMaxObserver) -> Any:
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                observer.update(output)

        return hook

    with _observing(modules, lambda module, obs: module.register_forward_hook(observe(obs))) as observers:
        yield observers


@contextmanager
def _observing(
    modules: Mapping[str, nn.Module], attach: Callable[[nn.Module, MinMaxObserver], RemovableHandle]
) -> Iterator[dict[str, MinMaxObserver]]:
    """One observer per module, attached by ``attach`` for the ``with`` block only."""
    observers = {name: MinMaxObserver() for name in modules}
    handles = [attach(module, observers[name]) for name, module in modules.items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()


def observed_ranges(observers: Mapping[str, MinMaxObserver]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (min, max)}`` of the observers that saw an input; a layer never called gets no range.

    Such a layer is then converted ``"dynamic"`` by
    :func:`~lightning_compress.core.quant.convert.quantize_model`, which says why in ``fallbacks``
    (``QuantizeOnFitEnd`` does the same).

    Example:
        >>> import torch
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> with record_input_ranges({"a": a, "b": b}) as obs:
        ...     _ = a(torch.ones(1, 2))
        >>> list(observed_ranges(obs))
        ['a']
    """
    return {name: (o.min_val, o.max_val) for name, o in observers.items() if o.count > 0}


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def static_input_modules(model: nn.Module, targets: Sequence[Target]) -> dict[str, nn.Module]:
    """The modules whose input ranges ``mode="static"`` needs: targets of a static kind and their tied partners."""
    modules: dict[str, nn.Module] = {}
    for target in targets:
        for name in (target.name, *(k.rpartition(".")[0] for k in getattr(target, "tied", ()))):
            module = target.module if name == target.name else _get(model, name)
            entry = None if module is None else int8_kind_for(module)
            if module is not None and entry is not None and entry.static_input:
                modules[name] = module
    return modules


def static_output_modules(model: nn.Module, targets: Sequence[Target]) -> dict[str, nn.Module]:
    """Those of :func:`static_input_modules` whose kind quantizes its output too (``Conv2d``)."""
    modules = static_input_modules(model, targets)
    return {name: m for name, m in modules.items() if (entry := int8_kind_for(m)) is not None and entry.static_output}
