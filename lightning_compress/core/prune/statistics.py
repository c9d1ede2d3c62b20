r"""Input statistics for activation-aware scores: the squared L2 norm of each input feature of a layer.

The ``"wanda"`` score (:func:`~lightning_compress.core.prune.scores.wanda_score`) weighs each weight by the
norm of the input feature it multiplies. :class:`InputNormCollector` measures those norms with forward
*pre*-hooks that the caller installs only for the batches it needs (:meth:`InputNormCollector.install`)
and removes right after (:meth:`InputNormCollector.remove`); the model's parameters and ``state_dict``
are never touched. For each selected weight it accumulates, over every call the layer sees while
installed, :math:`\sum x_j^2` per input feature ``j``:

* ``nn.Linear`` (and its subclasses) and Hugging Face ``Conv1D``: over every leading dimension of the
  input (batch, sequence, ...), one entry per input feature, i.e. the weight's *true* input axis
  (dim 1 of a Linear weight, dim 0 of a ``Conv1D`` ``[in, out]`` weight);
* ``nn.Conv1d/2d/3d``: over the unfolded input patches, i.e. one entry per input channel and kernel
  position, shaped like the weight's ``(in / groups, *kernel)`` for every group (the statistic is
  ``(in, *kernel)``; :meth:`InputNormCollector.norms` maps it onto each group's rows). Zero padding
  adds nothing; other padding modes are applied as the layer applies them;
* ``nn.MultiheadAttention``: the packed ``in_proj_weight`` gets the norms of the *query* input: its
  query, key and value blocks share that input (exact for self-attention, where the three are the
  same tensor; an approximation for cross-attention). Separate ``q/k/v_proj_weight`` get the query,
  key and value inputs respectively. Its ``out_proj`` is never called as a module (the attention
  function reads its weight directly), so it sees no input: see :attr:`InputNormCollector.unseen`.

Accumulators are float32 on the layer's device; :meth:`state` / :meth:`load_state` give and take CPU
copies, so a resumed run continues with exactly the sums it stopped with. Pure torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.core.hooks import HookSet
from lightning_compress.core.selection import Target, is_hf_conv1d

__all__ = ["InputNormCollector", "conv_patch_square_sums", "flat_sums", "split_sums"]

_MHA_INPUT = {"in_proj_weight": 0, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}
_MHA_NAMES = ("query", "key", "value")


def _pad_for(conv: nn.modules.conv._ConvNd, x2: Tensor) -> Tensor:
    """``x2`` (the squared input) padded as the convolution pads its input."""
    dims = x2.dim() - 2
    kernel, dilation = conv.kernel_size, conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x2
        pads: list[int] = []  # "same": torch puts the extra element on the right
        for d in reversed(range(dims)):
            total = dilation[d] * (kernel[d] - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for d in reversed(range(dims)) for p in (conv.padding[d], conv.padding[d])]
    if not any(pads):
        return x2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x2, pads, mode=mode)  # padding of x**2 == (padding of x)**2 for every mode


def conv_patch_square_sums(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    r"""``(in, *kernel)``: :math:`\sum` of the squared entries of the unfolded input patches of ``conv`` on ``x``.

    Entry ``[c, k]`` sums ``x[n, c, p * stride + k * dilation]**2`` (padded input) over the batch ``n``
    and every output position ``p``: the squared norm of the input feature that weight ``[:, c, k]``
    multiplies (within its group).

    Example:
        >>> conv = nn.Conv1d(1, 1, 2, bias=False)
        >>> conv_patch_square_sums(conv, torch.tensor([[[1.0, 2.0, 3.0]]]))  # patches [1, 2], [2, 3]
        tensor([[ 5., 13.]])
    """
    dims = x.dim() - 2
    if dims < 1:  # an unbatched input
        x = x.unsqueeze(0)
        dims = x.dim() - 2
    x2 = _pad_for(conv, x.detach().float().square().sum(0, keepdim=True))[0]  # (in, *padded)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    sizes = [(x2.shape[1 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(dims)]
    out = x2.new_zeros((x2.shape[0], *kernel))
    for position in itertools.product(*(range(k) for k in kernel)):
        index: list[Any] = [slice(None)]
        for d, k in enumerate(position):
            start = k * dilation[d]
            index.append(slice(start, start + stride[d] * (sizes[d] - 1) + 1, stride[d]))
        key: tuple[Any, ...] = (slice(None), *position)
        out[key] = x2[tuple(index)].sum(dim=tuple(range(1, dims + 1)))
    return out


class InputNormCollector(HookSet):
    """Accumulates the squared input norms of selected weights while its pre-hooks are installed.

    Args:
        targets: the selected weights (:func:`~lightning_compress.core.selection.select_targets`); a weight
            whose module is of no kind listed in the module docstring gets no hook and stays unseen.

    Example:
        >>> from lightning_compress.core.selection import select_targets
        >>> fc = nn.Sequential(nn.Linear(2, 1, bias=False))
        >>> collector = InputNormCollector(select_targets(fc, ["Linear"], []))
        >>> collector.install()
        >>> _ = fc(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> collector.remove()
        >>> collector.sums["0.weight"], collector.norms()["0.weight"]
        (tensor([10.,  4.]), tensor([3.1623, 2.0000]))
    """

    def __init__(self, targets: Iterable[Target]) -> None:
        super().__init__()
        self.targets = {t.param_name: t for t in targets}
        self.sums: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}

    # ------------------------------------------------------------------ hooks

    installed = HookSet._hooks_on
    install = HookSet._put_hooks_on
    remove = HookSet._take_hooks_off  # the sums stay

    @override
    def _register_hooks(self) -> Iterator[RemovableHandle]:
        """One forward pre-hook on each selected module that has an input to observe."""
        by_module: dict[int, list[Target]] = {}
        modules: dict[int, nn.Module] = {}
        for target in self.targets.values():
            by_module.setdefault(id(target.module), []).append(target)
            modules[id(target.module)] = target.module
        for key, targets in by_module.items():
            module = modules[key]
            if not self._observable(module, targets[0]):
                continue
            hook = self._hook(module, [t.param_name for t in targets], [t.attr for t in targets])
            yield module.register_forward_pre_hook(hook, with_kwargs=True)

    @staticmethod
    def _observable(module: nn.Module, target: Target) -> bool:
        if isinstance(module, nn.MultiheadAttention):
            return target.attr in _MHA_INPUT
        return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or is_hf_conv1d(module)

    def _hook(self, module: nn.Module, names: list[str], attrs: list[str]) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            for name, attr in zip(names, attrs, strict=True):
                x = self._input_of(mod, attr, args, kwargs)
                if isinstance(x, Tensor):
                    self._add(name, self._square_sums(mod, x))

        return hook

    @staticmethod
    def _input_of(module: nn.Module, attr: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(module, nn.MultiheadAttention):
            position = _MHA_INPUT[attr]
            return args[position] if len(args) > position else kwargs.get(_MHA_NAMES[position])
        return args[0] if args else next(iter(kwargs.values()), None)

    @staticmethod
    @torch.no_grad()
    def _square_sums(module: nn.Module, x: Tensor) -> Tensor:
        if isinstance(module, nn.modules.conv._ConvNd):
            return conv_patch_square_sums(module, x)
        x = x.detach()
        return x.reshape(-1, x.shape[-1]).float().square().sum(0)

    @torch.no_grad()
    def _add(self, name: str, value: Tensor) -> None:
        if name in self.sums:
            self.sums[name].add_(value)
        else:
            self.sums[name] = value.clone()
        self.calls[name] = self.calls.get(name, 0) + 1

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The shape of the statistic of weight ``name``: ``(in,)``, or ``(in, *kernel)`` for a convolution."""
        target = self.targets[name]
        module, weight = target.module, target.weight
        if isinstance(module, nn.modules.conv._ConvNd):
            return (module.in_channels, *module.kernel_size)
        if is_hf_conv1d(module):
            return (int(weight.shape[0]),)
        return (int(weight.shape[1]),)

    # ------------------------------------------------------------------ results

    @property
    def seen(self) -> bool:
        """Whether any input was observed since the last :meth:`reset`."""
        return bool(self.calls)

    @property
    def unseen(self) -> list[str]:
        """Selected weights whose layer saw no input since the last :meth:`reset`."""
        return [name for name in self.targets if name not in self.sums]

    def reset(self) -> None:
        """Forget every sum (after a mask update: the next one measures afresh)."""
        self.sums, self.calls = {}, {}

    def norms(self, sums: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        r"""``name -> `` :math:`\lVert x_j \rVert_2`, shaped as :func:`~.scores.wanda_score` reads it.

        A Linear / ``Conv1D`` / attention weight gets one norm per input feature; an ungrouped
        convolution ``(in, *kernel)``; a grouped one the full ``(out, in / groups, *kernel)`` (each
        group's rows see their own input channels). Unseen weights are left out.

        Args:
            sums: the squared sums to use (e.g. all-reduced across processes); default :attr:`sums`.
        """
        sums = self.sums if sums is None else sums
        out: dict[str, Tensor] = {}
        for name, total in sums.items():
            norm = total.clamp_min(0).sqrt()
            module = self.targets[name].module
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
                groups = module.groups
                per_group = norm.reshape(groups, norm.shape[0] // groups, *norm.shape[1:])
                rows = module.out_channels // groups
                norm = per_group.repeat_interleave(rows, dim=0)
            out[name] = norm
        return out

    def state(self) -> dict[str, Any]:
        """CPU copies of the sums and call counts."""
        return {
            "sums": {name: t.detach().cpu().clone() for name, t in self.sums.items()},
            "calls": dict(self.calls),
        }

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state` (the sums go to each weight's device)."""
        self.reset()
        if not state:
            return
        for name, total in state.get("sums", {}).items():
            if name in self.targets:
                device = self.targets[name].weight.device
                self.sums[name] = torch.as_tensor(total, dtype=torch.float32).to(device).clone()
        self.calls = {k: int(v) for k, v in state.get("calls", {}).items() if k in self.sums}


def flat_sums(sums: Mapping[str, Tensor], names: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> Tensor:
    """The sums of ``names`` in one flat float32 tensor (zeros for a missing one), for one all-reduce."""
    parts = [
        sums[n].reshape(-1).float() if n in sums else torch.zeros(math.prod(shapes[n]), dtype=torch.float32)
        for n in names
    ]
    devices = {p.device for p in parts}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    return torch.cat([p.to(device) for p in parts]) if parts else torch.zeros(0)


def split_sums(flat: Tensor, names: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The inverse of :func:`flat_sums`."""
    out, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        out[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    return out
