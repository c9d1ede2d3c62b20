"""Which int8 weight storage suits the CPU at hand (``weight_dtype="auto"``).

ONNX Runtime multiplies uint8 activations with int8 weights (u8 x s8). On x86 CPUs without VNNI
(AVX2 only) that kernel adds pairs of products in int16 (``vpmaddubsw``), which saturates for large
activation codes times large weights (255 x 127 x 2 > 32767; the codes are around 128 for signed
inputs, so it happens on ordinary data). Measured here, on the random-init MLP of the export tests
with int8 weights: relative error 0.07 / 0.16 and 94 % / 80 % top-1 agreement with the PyTorch int8
model (dynamic / static), against 0.006 / 0.009 and 100 % / 98 % with uint8 weights; on a layer
fed activations near the top of their range, 0.41 against 0.001. Its u8 x u8 kernels do not
saturate, so on such CPUs the weights are stored as uint8 (``int8 + 128``, zero point 128: the
same values in one byte each), which costs up to 1.4x in speed on small layers (see
:doc:`/deploying`). VNNI CPUs and ARM have exact u8 x s8 kernels.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["auto_weight_dtype", "cpu_flags"]

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512vnni")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.lower().startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def auto_weight_dtype() -> str:
    """``"uint8"`` on x86 CPUs without VNNI (where u8 x s8 saturates), else ``"int8"``."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return "int8"
    flags = cpu_flags()
    if not flags:
        return "int8"
    return "int8" if any(f in flags for f in _VNNI_FLAGS) else "uint8"
