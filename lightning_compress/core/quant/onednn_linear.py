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
and 0.90-0.94x at 64-256. Below 32 rows fbgemm's ``linear_dynamic``, which quantizes inside the
op, wins on layers whose weight stays in the caches (a chain of four 2048 x 2048 layers: oneDNN
1.33-1.61x at 8 rows, 0.92-1.13x at 16, one thread; 1.04-1.26x at 16 on two), but not on layers of
:data:`ONEDNN_LARGE_WEIGHTS` or more, whose weight streams from memory at every call (a chain of
four 4096 x 4096 layers, the 4-layer MLP of the benchmark: oneDNN 0.81-0.83x at 16 rows, 0.74-0.83x
at 24, on one thread and on two; 0.87-1.0x at 8 rows on one thread but 1.02-1.14x on two, and
1.08-1.29x at 2-6 rows), so those take it from :data:`ONEDNN_LARGE_MIN_ROWS` rows on. With a
single 4096 x 4096 layer called again and again (its weight partly cached) oneDNN measured
1.03-1.35x at 1-16 rows: the ~10 small passes of the quantization run cold after the GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_compress.core.quant.onednn import onednn_int8_ops_present
from lightning_compress.core.quant.primitives import QMAX

__all__ = [
    "ONEDNN_LARGE_MIN_ROWS",
    "ONEDNN_LARGE_WEIGHTS",
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

ONEDNN_LARGE_WEIGHTS = 1 << 24
"""Layers of this many weights (4096 x 4096) or more take oneDNN's product from :data:`ONEDNN_LARGE_MIN_ROWS` rows."""

ONEDNN_LARGE_MIN_ROWS = 16
"""The fewest rows with which a layer of :data:`ONEDNN_LARGE_WEIGHTS` weights or more takes oneDNN's product."""

_ZERO_POINT = QMAX + 1
_PROBED: dict[str, bool] = {}


def onednn_linear_available() -> bool:
    """Whether oneDNN's u8 x s8 linear exists here and its int32 sums are exact on this CPU (probed once)."""
    if "ok" not in _PROBED:
        _PROBED["ok"] = _probe()
    return _PROBED["ok"]


def onednn_pays(rows: int, weights: int) -> bool:
    """Whether a call of ``rows`` rows on a layer of ``weights`` weights takes oneDNN's product.

    At least :data:`ONEDNN_MIN_ROWS` rows and :data:`ONEDNN_MIN_MACS` multiply-adds on a layer of
    :data:`ONEDNN_MIN_WEIGHTS` weights or more; or at least :data:`ONEDNN_LARGE_MIN_ROWS` rows on a
    layer of :data:`ONEDNN_LARGE_WEIGHTS` weights or more.

    Example:
        >>> onednn_pays(64, 4096 * 4096), onednn_pays(16, 4096 * 4096), onednn_pays(8, 4096 * 4096)
        (True, True, False)
        >>> onednn_pays(16, 2048 * 2048), onednn_pays(32, 2048 * 2048), onednn_pays(32, 1024 * 1024)
        (False, True, False)
    """
    if weights < ONEDNN_MIN_WEIGHTS:
        return False
    if weights >= ONEDNN_LARGE_WEIGHTS and rows >= ONEDNN_LARGE_MIN_ROWS:
        return True
    return rows >= ONEDNN_MIN_ROWS and rows * weights >= ONEDNN_MIN_MACS


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
