"""oneDNN's u8 x s8 convolution for a static :class:`~lightning_compress.core.quant.conv2d.Int8Conv2d` on the CPU.

A static int8 convolution computes its integer sums ``sum (q_x * Q_W)`` of input codes and int8
weights, then rescales them once (:meth:`Int8Conv2d._integer_forward`). Without this module those
sums come from ``F.conv2d`` on the codes held as float32 (exact below 2^24), which costs a float
convolution plus the rounding passes: measured 1.10x the float32 model on resnet18 (AMD EPYC,
AVX-512 VNNI, one thread). Here they come from oneDNN's int8 convolution
(``torch.ops.onednn.qconv2d_pointwise``, the kernel ``torch.compile``'s x86 int8 path lowers to):
the codes shifted by ``Z = 128`` into unsigned bytes, the weight prepacked once
(``torch.ops.onednn.qconv_prepack``), called with every scale 1 and a float32 output, so the
op returns the integer sums themselves (int32 accumulators, exact, converted to float32). The rest
of the computation (bias count, one rescale, rounding) is unchanged, so the outputs are the same
numbers as ``F.conv2d``'s integer form (tested with ``torch.equal``) while the accumulator stays
below 2^24, and exact beyond it where the float form is not.

Used only where it is exact: :func:`onednn_conv_available` checks, once per process, that the ops
exist and that an adversarial product (codes 127, zero point 128, so ``u = 255``, times weights
127) comes out exact, which holds on CPUs whose u8 x s8 instruction accumulates in int32 (VNNI,
AMX); elsewhere (AVX2) the layer keeps ``F.conv2d``. The prepacked weight is a non-persistent cache
on the layer (rebuilt when the weight or a shape attribute changes; never in a ``state_dict``,
copy or pickle).

The op's output follows its input's memory format: a channels-last input (``x.contiguous(
memory_format=torch.channels_last)``, or a model converted with ``model.to(memory_format=
torch.channels_last)``) gets a channels-last output, as from ``F.conv2d``, and is fastest: the
layer reorders nothing. A contiguous (NCHW) input is reordered to channels-last bytes and its
output back to NCHW, which costs one pass over the float output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_compress.core.quant.fbgemm import has_vnni
from lightning_compress.core.quant.primitives import QMAX, TransientCache, tensor_version

if TYPE_CHECKING:
    from lightning_compress.core.quant.conv2d import Int8Conv2d

__all__ = [
    "CONV_KERNELS",
    "MIN_DEPTH",
    "MIN_POSITIONS",
    "conv_kernel",
    "conv_sums",
    "onednn_int8_ops_present",
    "onednn_conv_available",
    "use_onednn_conv",
]

CONV_KERNELS: tuple[str, ...] = ("onednn_u8s8", "conv_codes", "dequant")
"""How an ``Int8Conv2d`` computes (:attr:`Int8Conv2d.kernel`): a static one's integer sums by oneDNN or by
``F.conv2d`` on the codes; a dynamic or weight-only one with its dequantized weight."""

MIN_DEPTH = 512
"""Products summed per output (``in_channels / groups * kernel height * kernel width``) from which a layer
takes oneDNN's convolution.

Measured per layer (AMD EPYC, AVX-512 VNNI, one thread; resnet18, mobilenet_v3_small, the digits
CNN): the reorders into and out of oneDNN's layout cost a pass over the input bytes and one over
the float output, which a deep sum repays (resnet18's 3x3 convolutions, depth 576-4608: 0.21-0.65x
of the ``F.conv2d`` form) and a shallow one does not (mobilenet_v3_small's 1x1 and depthwise
convolutions, depth 9-288: 0.81-1.70x, most above 1; resnet18's 1x1 ones, depth 64-256:
0.74-1.43x).
"""

MIN_POSITIONS = 64
"""Output positions per call (batch x output height x output width) from which oneDNN's convolution is used.

Below it (the 1x1 maps of a squeeze-and-excitation block, a batch of one at the end of a
network) the fixed cost of the call outweighs the sums (measured 1.1-1.6x the ``F.conv2d`` form at
4 positions). The two forms give the same numbers, so this choice per call changes no result.
"""

ZERO_POINT = QMAX + 1
"""The shift that turns a symmetric int8 code ``q`` in ``[-127, 127]`` into the byte ``q + 128``."""

_PROBED: dict[str, bool] = {}
_ENABLED: list[bool] = [True]
_ATTR = "_lc_onednn_conv"


@contextlib.contextmanager
def use_onednn_conv(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off inside the block (tests, benchmarks): off, every layer uses ``F.conv2d``."""
    saved = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = saved


def onednn_conv_available() -> bool:
    """Whether oneDNN's u8 x s8 convolution exists here and its int32 sums are exact on this CPU (probed once)."""
    if "ok" not in _PROBED:
        _PROBED["ok"] = _probe()
    return _PROBED["ok"] and _ENABLED[0]


def onednn_int8_ops_present(*names: str) -> bool:
    """Whether ``torch.ops.onednn`` has the ops ``names``, oneDNN is built in and the CPU has VNNI or AMX.

    The first half of each oneDNN probe; the second half checks an adversarial product for exactness.
    """
    ops = torch.ops.onednn
    return (
        all(hasattr(ops, name) for name in names)
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and has_vnni()
    )


@torch.compiler.disable
def _probe() -> bool:
    if not onednn_int8_ops_present("qconv_prepack", "qconv2d_pointwise"):
        return False
    try:
        c, k = 64, 3
        weight = torch.full((8, c, k, k), QMAX, dtype=torch.int8)
        u = torch.full((1, c, 4, 4), QMAX + ZERO_POINT, dtype=torch.uint8)
        got = _Packed(weight, ((1, 1), (0, 0), (1, 1), 1)).sums(u)
    except Exception:  # an op that exists but fails here (a torch built without it)
        return False
    return bool((got == float(QMAX * QMAX * c * k * k)).all())


def _pack(
    weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int
) -> Any:
    ones = torch.ones(weight.shape[0])
    return torch.ops.onednn.qconv_prepack(
        weight.contiguous(), ones, 1.0, ZERO_POINT, list(stride), list(padding), list(dilation), groups, None
    )


class _Packed(TransientCache):
    """A layer's prepacked weight, with what it was built from (checked on every call).

    Also the op's unit weight scales and zero weight zero points, made once rather than per call.
    A copy or a pickle of the layer starts without it (rebuilt on use).
    """

    __slots__ = ("key", "ones", "packed", "version", "weight", "zeros")

    def __init__(self, weight: Tensor, key: tuple[Any, ...]) -> None:
        self.weight = weight
        self.version = tensor_version(weight)  # -2: an inference tensor, not checkable
        self.key = key
        stride, padding, dilation, groups = key
        with torch.inference_mode(False), torch.no_grad():
            self.packed = _pack(weight, stride, padding, dilation, groups)
            self.ones = torch.ones(weight.shape[0])
            self.zeros = torch.zeros(weight.shape[0], dtype=torch.long)

    def sums(self, u: Tensor) -> Tensor:
        """The int32 sums of the bytes ``u`` (codes + 128, channels-last) with the weight, as float32."""
        stride, padding, dilation, groups = self.key
        return torch.ops.onednn.qconv2d_pointwise(
            u, 1.0, ZERO_POINT, self.packed, self.ones, self.zeros, None, list(stride), list(padding),
            list(dilation), groups, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip


def conv_kernel(layer: Int8Conv2d) -> str:
    """The kernel ``layer`` uses for float32 inputs on its device: one of :data:`CONV_KERNELS` (deterministic).

    ``"onednn_u8s8"`` holds for calls of at least :data:`MIN_POSITIONS` output positions (smaller
    calls take ``F.conv2d`` on the codes, with the same numbers).

    Example:
        >>> from torch import nn
        >>> from lightning_compress.core.quant.conv2d import Int8Conv2d
        >>> conv_kernel(Int8Conv2d.from_float(nn.Conv2d(4, 4, 3), "dynamic"))
        'dequant'
    """
    if layer.input_scale is None:
        return "dequant"
    weight: Tensor = layer._buffers["weight"]  # type: ignore[assignment]
    if weight.is_cpu and _applies(layer) and onednn_conv_available():
        return "onednn_u8s8"
    return "conv_codes"


def _applies(layer: Int8Conv2d) -> bool:
    """Zero padding given as numbers, and a sum deep enough to repay the reorders (:data:`MIN_DEPTH`)."""
    kh, kw = layer.kernel_size
    deep = layer.in_channels // layer.groups * kh * kw >= MIN_DEPTH
    return deep and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"


def _positions(layer: Int8Conv2d, padding: tuple[int, int], shape: torch.Size) -> int:
    """Output positions of a call on a ``[N, C, H, W]`` input (``F.conv2d``'s output size)."""
    n, _, h, w = shape
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ph, pw = padding
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return n * max(out_h, 0) * max(out_w, 0)


def conv_sums(layer: Int8Conv2d, codes: Tensor) -> Tensor | None:
    """``F.conv2d(codes, layer's int8 weight as float)`` through oneDNN, or ``None`` where it does not apply.

    ``codes``: the input's int8 codes as float32 integers in ``[-127, 127]``, batched (4-d). Applies
    on the CPU, with zero padding given as numbers, to a layer of depth at least :data:`MIN_DEPTH`
    and a call of at least :data:`MIN_POSITIONS` output positions, when no gradient is asked for,
    outside ``torch.jit.trace``, and where :func:`onednn_conv_available`. The result has the
    memory format ``F.conv2d`` would give (channels-last for a channels-last input, else contiguous).
    """
    padding = layer.padding
    if not codes.is_cpu or codes.dim() != 4 or isinstance(padding, str) or not _applies(layer):
        return None
    if (torch.is_grad_enabled() and codes.requires_grad) or torch._C._get_tracing_state() is not None:
        return None
    if not onednn_conv_available() or _positions(layer, padding, codes.shape) < MIN_POSITIONS:
        return None
    weight: Tensor = layer._buffers["weight"]  # type: ignore[assignment]
    key = (layer.stride, padding, layer.dilation, layer.groups)
    plan: _Packed | None = layer.__dict__.get(_ATTR)
    if (
        plan is None
        or plan.weight is not weight
        or (plan.version != -2 and plan.version != weight._version)
        or plan.key != key
    ):
        plan = _Packed(weight, key)
        layer.__dict__[_ATTR] = plan
    # Channels-last only when it is not also contiguous (a 1x1 map is both): then F.conv2d keeps it.
    channels_last = not codes.is_contiguous() and codes.is_contiguous(memory_format=torch.channels_last)
    u = codes.add(ZERO_POINT).to(torch.uint8, memory_format=torch.channels_last)
    out = plan.sums(u)
    return out if channels_last else out.contiguous()
