"""What this torch and CPU offer the int8 kernels: fbgemm's prepacked ops, probed once per process.

:mod:`~lightning_compress.core.quant.kernels` chooses a kernel per layer from these answers
(:func:`fbgemm_available`, :func:`activation_qmax`, :func:`has_vnni`) and calls fbgemm through
:func:`fbgemm_pack`, :func:`fbgemm_u8s8_mm` and :func:`linear_dynamic`. Those quantized-tensor ops are
marked for removal in a future torch: they are used only behind :func:`fbgemm_available`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor

from lightning_compress.core.quant.primitives import QMAX

__all__ = [
    "activation_qmax",
    "cpu_flags",
    "fbgemm_available",
    "fbgemm_pack",
    "fbgemm_u8s8_mm",
    "has_vnni",
    "linear_dynamic",
]

_PROBED: dict[str, Any] = {}
"""What this process found out about the CPU once (read as constants while ``torch.compile`` traces)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 into int32 without saturation (VNNI or AMX; probed once)."""
    if "vnni" not in _PROBED:
        _probe()
    return bool(_PROBED["vnni"])


_FBGEMM_OPS = ("linear_prepack", "linear_with_input_q_dq_qweight_dq_output_fp32", "linear_dynamic")


def fbgemm_available() -> bool:
    """Whether this torch has fbgemm's prepacked int8 Linear ops and they run on this CPU."""
    if "fbgemm" not in _PROBED:
        _probe()
    return bool(_PROBED["fbgemm"])


@torch.compiler.disable
def _probe() -> None:
    ok = "fbgemm" in torch.backends.quantized.supported_engines and all(
        hasattr(torch.ops.quantized, name) for name in _FBGEMM_OPS
    )
    qmax = 0
    if ok:
        try:
            qmax = _measure_qmax()
        except Exception:  # an op that exists but fails here (a torch built without it)
            ok = False
    _PROBED["vnni"] = bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})
    _PROBED["qmax"] = qmax
    _PROBED["fbgemm"] = ok


def fbgemm_pack(weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Any:
    """Prepack an int8 ``[N, K]`` weight with its float scales (and bias) for fbgemm.

    The scales become the packed weight's per-channel (or per-tensor) scales; a zero scale (an
    all-zero channel) is packed as 1, which changes nothing since its weights are zeros.
    """
    scale = torch.where(weight_scale > 0, weight_scale, torch.ones_like(weight_scale)).to(torch.float64)
    w = weight.detach().contiguous()
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        # Quantized tensors are marked for removal; they are only the carrier of the packed weight.
        warnings.simplefilter("ignore")
        try:
            torch.backends.quantized.engine = "fbgemm"
            if scale.numel() == 1:
                qw = torch._make_per_tensor_quantized_tensor(w, float(scale), 0)
            else:
                zeros = torch.zeros(scale.numel(), dtype=torch.long)
                qw = torch._make_per_channel_quantized_tensor(w, scale, zeros, 0)
            b = None if bias is None else bias.detach().to(torch.float32).contiguous()
            return torch.ops.quantized.linear_prepack(qw, b)
        finally:
            torch.backends.quantized.engine = engine


def fbgemm_u8s8_mm(x: Tensor, packed: Any, x_scale: float, zero_point: int) -> Tensor:
    """``x_scale * weight_scale * sum_k (u_mk - zero_point) w_nk (+ bias)`` in float32, one fbgemm call.

    ``u = clamp(round(x / x_scale) + zero_point, 0, 255)`` is the op's own quantization of the
    float32 ``[M, K]`` input.
    """
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return op(x, x_scale, zero_point, packed)


def activation_qmax() -> int:
    """The largest activation magnitude for which fbgemm's u8 x s8 product is exact on this CPU.

    127 when an adversarial product (activations 127, zero point 128, so ``u = 255``, times
    weights 127) comes out exact, i.e. the CPU accumulates u8 x s8 into int32 (VNNI); otherwise 63
    (``u <= 127``, so no pair of products can saturate int16). Measured once per process; 0 where
    fbgemm is not available.
    """
    if "qmax" not in _PROBED:
        _probe()
    return int(_PROBED["qmax"])


def _measure_qmax() -> int:
    k = 64
    w = torch.full((8, k), QMAX, dtype=torch.int8)
    packed = fbgemm_pack(w, torch.ones(8), None)
    x = torch.full((4, k), float(QMAX))
    got = fbgemm_u8s8_mm(x, packed, 1.0, QMAX + 1)
    return QMAX if bool((got == float(QMAX * QMAX * k)).all()) else (QMAX + 1) // 2 - 1


def linear_dynamic(x: Tensor, packed: Any, reduce_range: bool) -> Tensor:
    """``torch.ops.quantized.linear_dynamic``: u8 activations quantized on the range of ``x``, one call."""
    return torch.ops.quantized.linear_dynamic(x, packed, reduce_range)
