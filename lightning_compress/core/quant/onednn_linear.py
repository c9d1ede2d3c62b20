"""oneDNN's u8 x s8 matrix product for the large calls of a CPU ``Int8Linear`` (``"onednn_u8s8"`` kernel).

``torch.ops.onednn.qlinear_pointwise`` (the kernel ``torch.compile``'s x86 int8 path lowers to; not
part of the deprecated ``torch.ao.quantization`` API) multiplies unsigned bytes by the int8 weight,
prepacked once by ``torch.ops.onednn.qlinear_prepack``. It is given the symmetric int8 codes ``q``
of :func:`~lightning_compress.core.quant.primitives.quantize_rows` (dynamic) or
:func:`~lightning_compress.core.quant.primitives.quantize` (static) shifted to bytes ``q + 128``
(a bit flip of the int8 byte), a zero point of 128, and every scale 1, so it returns the integer
sums ``sum_k q_mk W_nk`` themselves (int32 accumulators converted to float32, as ``torch.mul``
converts ``torch._int_mm``'s int32 result). The layer then rescales them with the very operations
of its ``int_mm`` path, so the output is *bit-identical* to that path's (tested with
``torch.equal``): the same codes, the same sums, the same rounding.

Used only where the sums are exact (:func:`onednn_linear_available`: the ops exist and an
adversarial product, codes 127 shifted to 255 times weights 127, comes out exact, which holds on
CPUs whose u8 x s8 instruction accumulates in int32: VNNI, AMX), and only for calls large enough
to repay the elementwise passes around the op (:func:`onednn_pays`). Measured on an AMD EPYC with
AVX-512 VNNI, one thread, against the layer's fbgemm route (``benchmarks/int8_latency.py``): a
4096 x 4096 layer 0.73-0.86x at 32-256 rows, 2048 x 2048 0.84-0.92x, 1024 x 1024 1.05x at 32 rows
and 0.90-0.94x at 64-256; below 32 rows fbgemm's ``linear_dynamic``, which quantizes inside the
op, wins (oneDNN 1.03-1.35x at 1-16 rows of a 4096 x 4096 layer: the ~10 small passes of the
quantization run cold after a GEMM that streamed 16 MB through the caches).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_compress.core.quant.onednn import onednn_int8_ops_present
from lightning_compress.core.quant.primitives import QMAX

__all__ = [
    "ONEDNN_MIN_MACS",
    "ONEDNN_MIN_ROWS",
    "ONEDNN_MIN_WEIGHTS",
    "OnednnLinearPack",
    "onednn_linear_available",
    "onednn_pays",
]

ONEDNN_MIN_WEIGHTS = 1 << 20
"""Layers with fewer weights (``in_features * out_features``) never take oneDNN's product."""

ONEDNN_MIN_ROWS = 32
"""Calls with fewer rows take fbgemm's route."""

ONEDNN_MIN_MACS = 1 << 26
"""Calls with fewer multiply-adds (rows x weights) take fbgemm's route (1024 x 1024 at 32 rows: 1.05x)."""

_ZERO_POINT = QMAX + 1
_PROBED: dict[str, bool] = {}


def onednn_linear_available() -> bool:
    """Whether oneDNN's u8 x s8 linear exists here and its int32 sums are exact on this CPU (probed once)."""
    if "ok" not in _PROBED:
        _PROBED["ok"] = _probe()
    return _PROBED["ok"]


def onednn_pays(rows: int, weights: int) -> bool:
    """Whether a call of ``rows`` rows on a layer of ``weights`` weights takes oneDNN's product.

    Example:
        >>> onednn_pays(64, 4096 * 4096), onednn_pays(16, 4096 * 4096), onednn_pays(32, 1024 * 1024)
        (True, False, False)
    """
    return weights >= ONEDNN_MIN_WEIGHTS and rows >= ONEDNN_MIN_ROWS and rows * weights >= ONEDNN_MIN_MACS


@torch.compiler.disable
def _probe() -> bool:
    if not onednn_int8_ops_present("qlinear_prepack", "qlinear_pointwise"):
        return False
    try:
        k = 256
        pack = OnednnLinearPack(torch.full((8, k), QMAX, dtype=torch.int8))
        got = pack.sums(torch.full((4, k), QMAX, dtype=torch.int8))
    except Exception:  # an op that exists but fails here (a torch built without it)
        return False
    return bool((got == float(QMAX * QMAX * k)).all())


class OnednnLinearPack:
    """An int8 ``[N, K]`` weight prepacked for oneDNN, with the op's unit scales and zero points."""

    __slots__ = ("ones", "packed", "zeros")

    def __init__(self, weight: Tensor) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.packed: Any = torch.ops.onednn.qlinear_prepack(weight.detach().contiguous(), None)
            self.ones = torch.ones(weight.shape[0])
            self.zeros = torch.zeros(weight.shape[0], dtype=torch.long)

    def sums(self, q: Tensor) -> Tensor:
        """``sum_k q_mk W_nk`` as float32 ``[M, N]`` for int8 codes ``q`` ``[M, K]`` (consumed: flipped in place)."""
        u = q.view(torch.uint8).bitwise_xor_(_ZERO_POINT)  # q + 128 as a byte
        return torch.ops.onednn.qlinear_pointwise(
            u, 1.0, _ZERO_POINT, self.packed, self.ones, self.zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
