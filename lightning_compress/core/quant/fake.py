r"""Fake quantization for quantization-aware training (QAT), in pure torch.

During QAT a layer computes with its weight quantized to the int8 grid and read back
(:math:`\hat w = s\,\operatorname{clamp}(\operatorname{round}(w / s), -127, 127)`, the same
:func:`~lightning_compress.core.quant.primitives.quantize` / ``dequantize`` the int8 conversion uses,
so :math:`\hat w` is *bit-identical* to the dequantized weight of the int8 layer made from :math:`w`)
and, for ``mode="static"``, with its input quantized with the scale of a moving min/max observer
and its bias rounded to the grid of the int32 product, as the int8 layer's is
(:func:`~lightning_compress.core.quant.primitives.bias_on_grid`).
Gradients pass by the straight-through estimator (Bengio et al. 2013): the weight's gradient is the
gradient of :math:`\hat w` unchanged (its scale covers the whole weight, so nothing is clipped);
the input's gradient is passed where the input lies inside the observed range and is zero where it
saturates (the clipped STE of Jacob et al. 2018).

Which inputs are fake-quantized: exactly those that the int8 layer quantizes with a fixed scale, the
inputs of the layers whose :class:`~lightning_compress.core.quant.table.Int8Kind` has
``static_input`` (``Linear``, HF ``Conv1D``, ``Conv2d``) and only for ``mode="static"``, and the
outputs of those with ``static_output`` (``Conv2d``: a static int8 convolution puts its input and its
output on calibrated grids, as ONNX Runtime's ``QLinearConv`` does), each with its own moving
observer. ``"weight_only"`` computes in float with an int8 weight, and ``"dynamic"`` quantizes each
input row with its own scale at run time (the row's own maximum: nothing to learn, and a rounding
error of at most half a step per row), so both fake-quantize the weights only. An embedding always
computes with its dequantized weight, so it too fake-quantizes the weight only.

**How the layers are switched** (:class:`FakeQuantSession`): a forward pre-hook swaps the layer's
``weight`` parameter, for the duration of one call, for its fake-quantized tensor (and quantizes the
input), and a forward hook (``always_call=True``, so it runs after an exception too) puts the
parameter back. Nothing is added to or renamed in the module: ``state_dict`` keys, the parameter
objects the optimizer and DDP hold, and ``load_state_dict(strict=True)`` are those of the plain model
at every moment outside a forward call. The hooks exist only while the session is attached
(:meth:`FakeQuantSession.attach` / :meth:`~FakeQuantSession.detach`); they are instances of
module-level classes holding plain tensors, so a model pickled or deep-copied during QAT still
pickles (the copy fake-quantizes on its own).

Observer ranges are plain tensors (:meth:`FakeQuantSession.state` /
:meth:`~FakeQuantSession.load_state`, ``torch.load(weights_only=True)`` safe); under data
parallelism reduce them with :meth:`FakeQuantSession.reduce_ranges` after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.core.hooks import HookSet
from lightning_compress.core.quant.base import MODES
from lightning_compress.core.quant.primitives import (
    QMAX,
    RangeObserver,
    bias_on_grid,
    dequantize,
    on_grid,
    quantize,
    scale_from_range,
    weight_scales,
)
from lightning_compress.core.quant.table import int8_kind_for
from lightning_compress.errors import check_choice

__all__ = [
    "DEFAULT_AVERAGING",
    "FakeQuantSession",
    "MovingMinMaxObserver",
    "fake_quantize_input",
    "fake_quantize_weight",
]

DEFAULT_AVERAGING = 0.01
"""The moving-average constant of :class:`MovingMinMaxObserver` (the one of ``torch.ao``'s observer)."""


class _WeightSTE(torch.autograd.Function):
    """Forward: the fake-quantized weight (computed exactly as the int8 conversion); backward: identity."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, scale: Tensor) -> Tensor:
        return dequantize(quantize(weight, scale, axis=0), scale, axis=0, dtype=weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _InputSTE(torch.autograd.Function):
    """Forward: ``scale * clamp(round(x / scale), -127, 127)``; backward: the gradient where ``x`` did not saturate."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale)
        return on_grid(x, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, scale = ctx.saved_tensors
        inside = x.abs() <= scale * (QMAX + 0.5)
        return grad * inside.to(grad.dtype), None


def fake_quantize_weight(weight: Tensor, per_channel: bool = True) -> Tensor:
    """The weight on the int8 grid and back, with a straight-through gradient.

    Equal, bit for bit, to ``dequantize(quantize(w, s), s)`` with ``s = weight_scales(w, per_channel)``:
    what :meth:`Int8Linear.dequantize_weight` returns after ``Int8Linear.from_float``. A zero stays 0.0.

    Example:
        >>> w = torch.tensor([[1.0, 0.3, 0.0]], requires_grad=True)
        >>> fq = fake_quantize_weight(w)
        >>> fq.detach().tolist()[0][2], round(fq.detach().tolist()[0][1] * 127)  # zero kept; 0.3 -> 38/127
        (0.0, 38)
        >>> fq.sum().backward(); w.grad.tolist()
        [[1.0, 1.0, 1.0]]
    """
    out: Tensor = _WeightSTE.apply(weight, weight_scales(weight, per_channel).to(weight.device))
    return out


def fake_quantize_input(x: Tensor, scale: Tensor) -> Tensor:
    """``x`` on the int8 grid of the symmetric ``scale`` (saturating), with a clipped straight-through gradient.

    A scale of 0 (nothing observed yet) leaves ``x`` as it is.

    Example:
        >>> fake_quantize_input(torch.tensor([0.26, 5.0]), torch.tensor(0.01)).tolist()
        [0.25999999046325684, 1.2699999809265137]
    """
    if not bool(scale > 0):
        return x
    out: Tensor = _InputSTE.apply(x, scale.to(device=x.device, dtype=torch.float32))
    return out


class MovingMinMaxObserver(RangeObserver):
    """A moving average of the per-batch minimum and maximum of a layer's input.

    The first batch sets the range; each later batch moves it by ``averaging`` towards the batch's
    own min and max: ``min += averaging * (batch_min - min)`` (``torch.ao``'s
    ``MovingAverageMinMaxObserver``). Only :attr:`min_val`, :attr:`max_val` (0-d float32) and
    :attr:`count` are kept.

    Example:
        >>> obs = MovingMinMaxObserver(averaging=0.5)
        >>> obs.update(torch.tensor([-1.0, 2.0])); obs.update(torch.tensor([0.0, 4.0]))
        >>> obs.min_val.item(), obs.max_val.item(), obs.count
        (-0.5, 3.0, 2)
    """

    def __init__(self, averaging: float = DEFAULT_AVERAGING) -> None:
        super().__init__()
        self.averaging = float(averaging)

    @override
    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Move the range towards ``x``'s min and max (NaN and inf entries are ignored)."""
        bounds = self.finite_range(x)
        if bounds is None:
            return
        lo, hi = (v.cpu() for v in bounds)
        if self.count == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.averaging * (lo - self.min_val)
            self.max_val = self.max_val + self.averaging * (hi - self.max_val)
        self.count += 1

    def scale(self) -> Tensor:
        """The symmetric scale covering the range (0-d float32, CPU; 0 before the first batch)."""
        return scale_from_range(self.min_val, self.max_val)


class _PreHook:
    """Swap ``weight`` for its fake-quantized tensor (and fake-quantize the input) for one call."""

    def __init__(self, per_channel: bool, observer: MovingMinMaxObserver | None, transposed: bool = False) -> None:
        self.per_channel = per_channel
        self.observer = observer
        self.transposed = transposed  # HF Conv1D: the weight is [in, out]; a channel is a column
        self.stash: list[Tensor] = []
        self.bias_stash: list[Tensor | None] = []  # the float bias while a static call runs on its grid

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        weight = module._parameters["weight"]
        assert weight is not None  # only layers with a weight are attached
        self.stash.append(weight)
        channels = weight.t() if self.transposed else weight
        w_scale = weight_scales(channels, self.per_channel).to(weight.device)  # also the bias grid's, below
        fake: Tensor = _WeightSTE.apply(channels, w_scale)
        module._parameters["weight"] = fake.t() if self.transposed else fake  # type: ignore[assignment]
        if self.observer is None or not args or not isinstance(args[0], Tensor):
            self.bias_stash.append(None)
            return None
        x = args[0]
        if module.training and torch.is_grad_enabled():
            self.observer.update(x)
        scale = self.observer.scale()
        bias = module._parameters.get("bias")
        self.bias_stash.append(bias)
        if bias is not None:  # the int32 bias of the int8 layer (its gradient passes straight through)
            module._parameters["bias"] = bias_on_grid(bias, scale, w_scale)  # type: ignore[assignment]
        return (fake_quantize_input(x, scale), *args[1:])


class _PostHook:
    """Put the float weight back (and, for a convolution in static mode, fake-quantize the output)."""

    def __init__(self, pre: _PreHook, observer: MovingMinMaxObserver | None = None) -> None:
        self.pre = pre
        self.observer = observer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if self.pre.stash:
            module._parameters["weight"] = self.pre.stash.pop()  # type: ignore[assignment]
        if self.pre.bias_stash and (bias := self.pre.bias_stash.pop()) is not None:
            module._parameters["bias"] = bias  # type: ignore[assignment]
        if self.observer is None or not isinstance(output, Tensor):
            return None
        if module.training and torch.is_grad_enabled():
            self.observer.update(output)
        return fake_quantize_input(output, self.observer.scale())


class FakeQuantSession(HookSet):
    """Fake quantization of a set of layers: observers, and hooks attached only while QAT runs.

    Args:
        layers: ``{name: module}`` of the layers that will become int8 (``Linear``, ``Conv2d``,
            ``Embedding``, HF ``Conv1D``: anything with a ``weight`` parameter whose int8 kind exists).
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``; only ``"static"`` fake-quantizes inputs,
            and only of the layers whose int8 kind has ``static_input`` (and the outputs of those
            whose kind has ``static_output``: convolutions).
        per_channel: one weight scale per output channel (dim 0; per row for an embedding; per column for
            HF ``Conv1D``, whose weight is ``[in, out]``), or one per tensor.
        averaging: the observers' moving-average constant.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> session = FakeQuantSession({"fc": layer}, "static", per_channel=False)
        >>> session.attach()
        >>> _ = layer(torch.randn(4, 3))
        >>> sorted(session.state()["fc"]), list(layer.state_dict())
        (['count', 'max', 'min'], ['weight', 'bias'])
        >>> session.detach()
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        mode: str,
        per_channel: bool = True,
        averaging: float = DEFAULT_AVERAGING,
    ) -> None:
        check_choice("mode", mode, MODES)
        super().__init__()
        self.layers = dict(layers)
        self.mode = mode
        self.per_channel = per_channel
        self.observers: dict[str, MovingMinMaxObserver] = {}
        self.output_observers: dict[str, MovingMinMaxObserver] = {}
        self._transposed: set[str] = set()
        for name, module in self.layers.items():
            if not isinstance(module._parameters.get("weight"), Tensor):
                raise TypeError(f"`{name}` ({type(module).__name__}) has no `weight` parameter to fake-quantize.")
            kind = int8_kind_for(module)
            if kind is not None and kind.name == "Int8Conv1D":
                self._transposed.add(name)
            if mode == "static" and kind is not None and kind.static_input:
                self.observers[name] = MovingMinMaxObserver(averaging)
                if kind.static_output:
                    self.output_observers[name] = MovingMinMaxObserver(averaging)

    attached = HookSet._hooks_on
    attach = HookSet._put_hooks_on
    detach = HookSet._take_hooks_off  # the layers are plain float layers again

    @override
    def _register_hooks(self) -> Iterator[RemovableHandle]:
        """On each layer, a pre-hook that fake-quantizes its weight (and input) and a hook that restores it."""
        for name, module in self.layers.items():
            pre = _PreHook(self.per_channel, self.observers.get(name), name in self._transposed)
            yield module.register_forward_pre_hook(pre)
            yield module.register_forward_hook(_PostHook(pre, self.output_observers.get(name)), always_call=True)

    def input_ranges(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (min, max)}`` of the observed inputs, as ``quantize_model``'s ``input_ranges`` takes them."""
        return {n: (o.min_val, o.max_val) for n, o in self.observers.items() if o.count > 0}

    def output_ranges(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{name: (min, max)}`` of the observed convolution outputs (``quantize_model``'s ``output_ranges``)."""
        return {n: (o.min_val, o.max_val) for n, o in self.output_observers.items() if o.count > 0}

    def state(self) -> dict[str, dict[str, Any]]:
        """The observers as plain values: ``{name: {"min": 0-d tensor, "max": 0-d tensor, "count": int}}``.

        A layer whose output is observed too (a convolution) also has ``"output"``: the same three
        entries for its output.
        """
        state = {n: _plain(o) for n, o in self.observers.items()}
        for n, o in self.output_observers.items():
            state[n]["output"] = _plain(o)
        return state

    def load_state(self, state: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore what :meth:`state` returned (names that are not observed here are ignored)."""
        for name, saved in state.items():
            if name in self.observers:
                _restore(self.observers[name], saved)
            if name in self.output_observers and isinstance(saved.get("output"), Mapping):
                _restore(self.output_observers[name], saved["output"])

    def reduce_ranges(self, all_gather: Callable[[Tensor], Tensor]) -> None:
        """Make every process hold the widest range any process holds (min of minima, max of maxima).

        ``all_gather`` maps a ``[L, 3]`` tensor to ``[world, L, 3]`` (Lightning's ``strategy.all_gather``);
        a result without the leading world dimension (one process) changes nothing.
        """
        obs = [*self.observers.values(), *self.output_observers.values()]
        if not obs:
            return
        stats = torch.tensor([[o.min_val.item(), o.max_val.item(), float(o.count)] for o in obs])
        gathered = all_gather(stats)
        if gathered.dim() != 3:
            return
        gathered = gathered.detach().cpu().to(torch.float32)
        seen = gathered[..., 2] > 0
        inf = torch.tensor(float("inf"))
        lo = torch.where(seen, gathered[..., 0], inf).amin(0)
        hi = torch.where(seen, gathered[..., 1], -inf).amax(0)
        count = gathered[..., 2].amax(0)
        for i, o in enumerate(obs):
            if count[i] > 0:
                o.min_val, o.max_val, o.count = lo[i].reshape(()), hi[i].reshape(()), int(count[i])


def _plain(obs: MovingMinMaxObserver) -> dict[str, Any]:
    return {"min": obs.min_val.clone(), "max": obs.max_val.clone(), "count": obs.count}


def _restore(obs: MovingMinMaxObserver, saved: Mapping[str, Any]) -> None:
    obs.min_val = torch.as_tensor(saved["min"], dtype=torch.float32).detach().cpu().reshape(())
    obs.max_val = torch.as_tensor(saved["max"], dtype=torch.float32).detach().cpu().reshape(())
    obs.count = int(saved["count"])
