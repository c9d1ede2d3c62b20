"""``Int8Conv1D``: Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2 family) in int8.

``Conv1D`` is a linear layer whose weight is stored transposed, ``[in, out]``, and that computes
``x @ weight + bias``. Its int8 version is an :class:`~lightning_compress.core.quant.modules.Int8Linear`
(every mode, the same ``torch._int_mm`` kernels): the int8 weight is stored ``[out, in]``, row-major,
with one scale per *true output channel* (a column of the float weight). Its ``weight`` attribute
reads ``[in, out]`` as the float layer's did (a transposed, float-typed view), so model code that
reads ``c_attn.weight.shape`` or ``.dtype`` sees what it saw before; the ``weight`` entry of its
``state_dict`` is the stored ``[out, in]`` int8 tensor.

This module does not import transformers: the table registers the entry the first time it is
asked about a model while ``transformers.pytorch_utils`` is imported
(:func:`~lightning_compress.core.quant.table.int8_kind_for`).
"""

from __future__ import annotations

from torch import Tensor, nn
from typing_extensions import Self, override

from lightning_compress.core.quant.modules import Int8Linear

__all__ = ["Int8Conv1D", "conv1d_forward_is_own"]


class Int8Conv1D(Int8Linear):
    """Hugging Face ``Conv1D`` with an int8 weight stored ``[out, in]``; ``.weight`` reads ``[in, out]``.

    Args:
        nf: output size (``Conv1D.nf``).
        nx: input size.
        bias: whether the layer has a bias (``Conv1D`` always has one).
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
        per_channel: one scale per output channel; otherwise one for the whole matrix.

    Example:
        >>> import torch
        >>> from transformers.pytorch_utils import Conv1D
        >>> layer = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs: weight [16, 8]
        >>> q = Int8Conv1D.from_float(layer)
        >>> tuple(q.weight.shape), tuple(q.int8_weight.shape), tuple(q.weight_scale.shape)
        ((16, 8), (8, 16), (8,))
        >>> x = torch.randn(3, 16)
        >>> bool((q(x) - layer(x)).abs().max() < 0.05)
        True
    """

    _weight_axis = 1

    def __init__(self, nf: int, nx: int, bias: bool = True, mode: str = "dynamic", per_channel: bool = True) -> None:
        super().__init__(nx, nf, bias, mode, per_channel)
        self.nf = nf

    @override
    @classmethod
    def _from_float(cls, module: nn.Module, mode: str, per_channel: bool, input_scale: Tensor | None) -> Self:
        """``module``: a ``Conv1D`` (weight ``[in, out]``); ``input_scale`` is needed for ``"static"``."""
        weight = module.weight
        bias = module.bias
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(f"Expected a Conv1D with a 2-D `weight`, but got {type(module).__name__}.")
        nx, nf = weight.shape
        new = cls(int(nf), int(nx), isinstance(bias, Tensor), mode, per_channel)
        return new._filled(weight.t(), bias if isinstance(bias, Tensor) else None, input_scale)

    @override
    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.in_features}, {self._extra()}"


def conv1d_forward_is_own(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` is ``Conv1D.forward`` itself (a subclass that overrides it stays float)."""
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
            return getattr(type(module), "forward", None) is getattr(cls, "forward", None)
    return False
