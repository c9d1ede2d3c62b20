"""How an :class:`~lightning_compress.core.quant.modules.Int8Linear` computes on the running machine.

The artifact always holds the same int8 weight and float32 scales; this module decides, per layer,
which *kernel* turns them into a product, and keeps whatever that kernel needs (a prepacked weight,
a dequantized float weight) in a non-persistent cache on the layer, never in its ``state_dict``.

Kernels (:data:`KERNELS`, shown as :attr:`Int8Linear.kernel <lightning_compress.core.quant.modules.Int8Linear.kernel>`):

* ``"fbgemm_u8s8"`` (x86 CPUs whose torch ships fbgemm): the weight is prepacked once by
  ``torch.ops.quantized.linear_prepack`` and every call is one
  ``torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32``: unsigned 8-bit activations
  (the symmetric integer ``q`` shifted by a zero point ``Z = qmax + 1``) times the signed int8
  weight, float32 out. Static mode passes its calibrated scale to that op (one call, after one
  min/max reduction; an input that leaves the calibrated range is clamped to it first, so no code
  leaves ``[-qmax, qmax]``).
  Dynamic mode calls ``torch.ops.quantized.linear_dynamic`` (the kernel of torch's own
  ``quantize_dynamic``: the op finds the input's range and quantizes it to u8 with a zero point,
  asymmetric, in one call), the float bias packed with the weight. A single row goes to it as is
  (one call, bias included); a batch of rows is first divided by each row's ``max |x|`` (and the
  product multiplied back, the packed bias taken off and added once), so that every row keeps its own scale: an
  outlier row cannot flatten the others' grid, as it would with one scale per call.
  ``qmax`` is 127 where the CPU's u8 x s8 instruction accumulates without saturation
  (VNNI: checked once per process by :func:`activation_qmax` on an adversarial product) and 63
  elsewhere (AVX2 / AVX-512 without VNNI sum two u8 x s8 products in a saturating int16, so the
  activations get 7 bits: static mode's symmetric grid is ``[-63, 63]``, dynamic mode passes
  ``reduce_range=True``, as torch's own dynamic quantization does there).
  Those quantized-tensor ops are marked for removal in a future torch: they are used behind
  :func:`fbgemm_available`, and without them the layer falls back to the kernels below.
* ``"onednn_u8s8"`` (layers of at least 2^20 weights on CPUs with VNNI or AMX and fbgemm): the
  ``"fbgemm_u8s8"`` kernel below for small calls, and for calls of at least 32 rows and 2^26
  multiply-adds (16 rows on layers of 2^24 weights or more) oneDNN's u8 x s8 product on the
  ``int_mm`` path's own codes, bit-identical to that path
  (:mod:`~lightning_compress.core.quant.onednn_linear`, which has the measurements).
* ``"float"``: one ``torch.addmm(bias, x, w_t)`` with the dequantized weight ``weight_scale *
  weight`` computed once and cached (float32) *transposed*, as a contiguous ``[in, out]`` matrix
  (layers with fewer than :data:`MIN_TRANSPOSED_OUT` outputs keep ``F.linear``'s transposed view of
  the ``[out, in]`` weight, faster there).
  That layout made the GEMM of the digits MLP's layers and of 256-1536-wide layers 0.6-0.9x of
  ``F.linear``'s (which multiplies by a transposed view of the ``[out, in]`` weight) at 1-64 rows
  and equal at 256 (Intel Xeon with AMX, one thread; mixed, 0.4-1.3x, on two threads of that
  2-core machine); the numbers agree with ``F.linear`` up to float32 rounding. Chosen where int8
  does not pay on this CPU: layers with fewer than :data:`MIN_INT8_WEIGHTS` weights (measured: the
  ~8 extra small kernels of an int8 product cost more than the whole float GEMM; see
  ``benchmarks/int8_latency.py``), and CPUs with neither fbgemm nor VNNI (where oneDNN's s8 x s8
  ``torch._int_mm`` was measured 3-50x slower than float32). The activations are then not
  quantized at all: the result is the weight-only int8 result, in static mode too (putting the
  input on its grid first measured 1.3-2.9x the float layer on the digits MLP, one thread, AVX-512
  VNNI: the elementwise passes cost more than its whole GEMM). Calls with many rows (up to 512)
  that autograd does not record take the ``"fbgemm_u8s8"`` route instead, on CPUs with VNNI
  (:mod:`~lightning_compress.core.quant.crossover`, :func:`int8_from_rows`).
* ``"sparse"``: the ``"float"`` kernel of a pruned layer (at least 256 inputs, and at most 10 % of
  its weights non-zero with 128 outputs or more, 5 % with 64-127), which also caches its
  dequantized weight as a CSR matrix and multiplies by that for calls with enough rows (at least
  32, and rows x non-zero weights at least 131,072) on one thread
  (:mod:`~lightning_compress.core.quant.sparse`).
* ``"int_mm"``: ``torch._int_mm`` (s8 x s8 -> s32, per-row activation scales), the 0.1 path: CUDA,
  x86 CPUs with VNNI but no fbgemm, and ``torch.export`` (a portable graph of standard ops).
* ``"dequant"``: the weight dequantized at every call (``mode="weight_only"``, other devices, inputs
  that are not float32 on the CPU).

The choice is a pure function of the layer's shape, its mode, the device and what this torch and
CPU offer (:func:`select_kernel`; for ``"sparse"``, also of which weights are zero:
:func:`with_sparse`; for the ``"float"`` kernel's large calls, also of the call's rows and the
thread count), so it is the same in every run on the same machine. What they offer
is probed, once per process, in :mod:`~lightning_compress.core.quant.fbgemm` (its names are re-exported here).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_compress.core.quant.crossover import CROSSOVER_MAX_ROWS, crossover_rows

# Re-exported: kernels.py was their home, and the kernel choice reads them.
from lightning_compress.core.quant.fbgemm import activation_qmax as activation_qmax
from lightning_compress.core.quant.fbgemm import cpu_flags as cpu_flags
from lightning_compress.core.quant.fbgemm import fbgemm_available as fbgemm_available
from lightning_compress.core.quant.fbgemm import fbgemm_pack as fbgemm_pack
from lightning_compress.core.quant.fbgemm import fbgemm_u8s8_mm as fbgemm_u8s8_mm
from lightning_compress.core.quant.fbgemm import has_vnni, linear_dynamic
from lightning_compress.core.quant.onednn_linear import (
    ONEDNN_MIN_WEIGHTS,
    OnednnLinearPack,
    onednn_linear_available,
    onednn_pays,
)
from lightning_compress.core.quant.primitives import (
    QMAX,
    TransientCache,
    bias_on_grid,
    dequantize,
    quantize,
    quantize_rows,
    restore_nonfinite_rows_,
    tensor_version,
)
from lightning_compress.core.quant.sparse import csr_linear, sparse_pays, to_csr, use_csr

if TYPE_CHECKING:
    from lightning_compress.core.quant.modules import Int8Linear

__all__ = [
    "KERNELS",
    "MIN_INT8_WEIGHTS",
    "MIN_TRANSPOSED_OUT",
    "int8_from_rows",
    "invalidate",
    "linear_forward",
    "prepare_kernels",
    "select_kernel",
    "use_kernel",
    "with_sparse",
]

KERNELS: tuple[str, ...] = ("onednn_u8s8", "fbgemm_u8s8", "float", "sparse", "int_mm", "dequant")
"""The ways an int8 Linear can compute (see the module docstring)."""

MIN_INT8_WEIGHTS = 1 << 18
"""Below this many weights (``in_features * out_features``) a CPU layer computes in float.

Calibrated on an AMD EPYC (AVX2, no VNNI; ``benchmarks/int8_latency.py``, 1 and 2 threads): a
256x256 layer through fbgemm was 2-5x slower than float32 at batch 1-16 and the digits MLP's layers
(64x300, 300x100, 100x10) 1-12x slower; from 512x512 on, fbgemm is at most as slow as float at
batch 1 and 2-5x faster from batch 16.
"""

MIN_TRANSPOSED_OUT = 16
"""The ``float`` kernel caches its weight as a contiguous ``[in, out]`` matrix from this many outputs on.

Narrower layers keep ``F.linear``'s own layout (a transposed view of the ``[out, in]`` weight): with
8 or 10 outputs the ``[in, out]`` GEMM measured 1.1-2.3x ``F.linear``'s at 16-256 rows (AMD EPYC,
AVX-512 VNNI, one thread), while from 12 outputs on it was 0.7-1.0x at 1-256 rows.
"""

_ATTR = "_lc_kernel_plan"

_FORCED: list[str | None] = [None]


@contextlib.contextmanager
def use_kernel(kernel: str | None) -> Iterator[None]:
    """Make every CPU int8 Linear (not ``weight_only``) use ``kernel`` inside the block (tests, benchmarks).

    ``"fbgemm_u8s8"`` where :func:`fbgemm_available` is false, ``"onednn_u8s8"`` where fbgemm or
    :func:`~lightning_compress.core.quant.onednn_linear.onednn_linear_available` is, and any kernel on
    other devices, is ignored (the usual choice stands). A forced ``"onednn_u8s8"`` takes oneDNN's
    product for every call, whatever its size.
    """
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"Expected `kernel` to be one of {KERNELS} or None, but got {kernel!r}.")
    saved = _FORCED[0]
    _FORCED[0] = kernel
    try:
        yield
    finally:
        _FORCED[0] = saved


def with_sparse(kernel: str, weight: Tensor) -> str:
    """``"sparse"`` for a ``"float"``-kernel layer whose int8 ``weight`` is pruned enough, else ``kernel``.

    See :mod:`~lightning_compress.core.quant.sparse` for the rule. A forced kernel stands as it is.

    Example:
        >>> w = torch.zeros(128, 600, dtype=torch.int8); w[:, :60] = 1
        >>> with_sparse("float", w), with_sparse("float", torch.ones_like(w)), with_sparse("fbgemm_u8s8", w)
        ('sparse', 'float', 'fbgemm_u8s8')
    """
    if kernel == "float" and _FORCED[0] is None and sparse_pays(weight):
        return "sparse"
    return kernel


def select_kernel(in_features: int, out_features: int, mode: str, device: torch.device | str) -> str:
    """The kernel an int8 Linear of this shape and mode uses on ``device`` (deterministic).

    Example:
        >>> select_kernel(64, 300, "dynamic", "cpu")  # a small layer: float pays more than int8
        'float'
        >>> select_kernel(4096, 4096, "weight_only", "cpu")
        'dequant'
    """
    device_type = torch.device(device).type
    if mode == "weight_only":
        return "dequant"
    if device_type == "cuda":
        return "int_mm"
    if device_type != "cpu":
        return "dequant"
    forced = _FORCED[0]
    if forced is not None and (forced not in _U8S8 or _u8s8_available(forced)):
        return forced
    weights = in_features * out_features
    if weights < MIN_INT8_WEIGHTS:
        return "float"
    if fbgemm_available():
        return "onednn_u8s8" if weights >= ONEDNN_MIN_WEIGHTS and onednn_linear_available() else "fbgemm_u8s8"
    return "int_mm" if has_vnni() else "float"


_U8S8 = ("fbgemm_u8s8", "onednn_u8s8")


def _u8s8_available(kernel: str) -> bool:
    return fbgemm_available() and (kernel == "fbgemm_u8s8" or onednn_linear_available())


class _Plan(TransientCache):
    """What one layer's kernel needs, built from (and checked against) the layer's current tensors.

    A copy or a pickle of the layer starts without a plan (the packed weight is rebuilt on use).
    """

    __slots__ = (
        "bias",
        "bound",
        "crossover",
        "forced",
        "kernel",
        "mode",
        "nnz",
        "onednn",
        "packed",
        "qmax",
        "reduce_range",
        "sources",
        "sparse",
        "versions",
        "weight",
        "x_scale",
    )

    def __init__(self, mode: str, sources: tuple[Any, ...]) -> None:
        weight, scale, bias, input_scale = sources
        self.sources = sources
        self.versions = tuple(tensor_version(t) for t in sources)
        self.mode = mode
        self.forced = _FORCED[0]
        self.kernel = with_sparse(select_kernel(weight.shape[1], weight.shape[0], mode, weight.device), weight)
        self.sparse: Tensor | None = None
        self.nnz = 0
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.packed: Any = None
        self.onednn: OnednnLinearPack | None = None
        self.qmax = QMAX
        self.reduce_range = False
        self.x_scale = 1.0
        self.bound = 0.0
        # Rows from which the "float" kernel takes fbgemm's route instead, (one thread, more): crossover.py.
        self.crossover: tuple[int, int] | None = None
        # Plain tensors even when built under inference_mode (the model may later run with autograd on).
        with torch.inference_mode(False), torch.no_grad():
            if self.kernel == "float" or self.kernel == "sparse":
                w = dequantize(weight, scale, axis=0)
                self.weight = w.t().contiguous() if weight.shape[0] >= MIN_TRANSPOSED_OUT else w.t()
                if self.kernel == "sparse":
                    self.sparse = to_csr(w)
                    self.nnz = int(torch.count_nonzero(weight))
                # The bias itself (a float32 parameter still trains, e.g. in a second fit of the int8 model).
                self.bias = bias if bias is None or bias.dtype is torch.float32 else bias.detach().to(torch.float32)
                if self.kernel == "float" and self.forced is None and has_vnni() and fbgemm_available():
                    n, k = weight.shape
                    one, more = crossover_rows(k, n, mode, 1), crossover_rows(k, n, mode, 2)
                    if one is not None:  # fbgemm's route for large calls (never: above the largest row count)
                        self._pack(weight, scale, bias, input_scale)
                        self.crossover = (one, CROSSOVER_MAX_ROWS + 1 if more is None else more)
            elif self.kernel in _U8S8:
                # The bias the layer adds itself (oneDNN's route; fbgemm's dynamic route, to rescale): for static,
                # the one on the product's grid that fbgemm packed and the int_mm path adds.
                self.bias = self._pack(weight, scale, bias, input_scale)

    def _pack(self, weight: Tensor, scale: Tensor, bias: Tensor | None, input_scale: Tensor | None) -> Tensor | None:
        """Set up fbgemm's route (packed weight, activation grid); returns the bias it packed, as float32."""
        self.qmax = activation_qmax()
        self.reduce_range = self.qmax < QMAX
        if self.mode == "static":
            # The calibrated range stays [-127 s, 127 s]; with 7-bit activations its step is doubled.
            s = float(input_scale) if input_scale is not None else 0.0
            self.bound = QMAX * s
            self.x_scale = s * QMAX / self.qmax if s > 0 else 1.0
            if bias is not None and input_scale is not None and s > 0:
                bias = bias_on_grid(bias.detach(), input_scale, scale)
        # Dynamic mode packs the float bias too: a single row is then one fbgemm call, the bias added
        # inside the op (the ops after a GEMM that streamed the weight run cold: one fewer measured
        # 3 % of a 4096-wide MLP at batch 1, one thread).
        self.packed = fbgemm_pack(weight, scale, bias)
        return None if bias is None else bias.detach().to(torch.float32)


def _sources(layer: Int8Linear) -> tuple[Any, ...]:
    buffers = layer._buffers
    return (buffers["weight"], buffers["weight_scale"], layer._parameters.get("bias"), buffers.get("input_scale"))


def _plan(layer: Int8Linear) -> _Plan:
    """The layer's plan, rebuilt when a source tensor was replaced or edited in place (a few attribute reads)."""
    plan: _Plan | None = layer.__dict__.get(_ATTR)
    if plan is not None:
        buffers = layer._buffers
        w: Any
        s: Any
        w, s, b, i = plan.sources
        wv, sv, bv, iv = plan.versions
        if (
            (wv == -2 or wv == w._version)
            and (sv == -2 or sv == s._version)
            and (b is None or bv == -2 or bv == b._version)
            and (i is None or iv == -2 or iv == i._version)
            and w is buffers["weight"]
            and s is buffers["weight_scale"]
            and b is layer._parameters.get("bias")
            and i is buffers.get("input_scale")
            and plan.mode == layer.mode
            and plan.forced is _FORCED[0]
        ):
            return plan
    plan = _Plan(layer.mode, _sources(layer))
    layer.__dict__[_ATTR] = plan
    return plan


def int8_from_rows(layer: Int8Linear) -> int | None:
    """From how many rows ``layer``, a ``"float"``-kernel layer, computes in int8 at the current thread count.

    It does so up to :data:`~lightning_compress.core.quant.crossover.CROSSOVER_MAX_ROWS` rows, for calls
    that autograd does not record; ``None`` where it never does (:mod:`~lightning_compress.core.quant.crossover`).
    """
    if layer.kernel != "float":
        return None
    crossover = _plan(layer).crossover
    rows = None if crossover is None else crossover[torch.get_num_threads() > 1]
    return rows if rows is not None and rows <= CROSSOVER_MAX_ROWS else None


def invalidate(layer: Int8Linear) -> None:
    """Drop the layer's cached kernel data (it is rebuilt on the next call)."""
    layer.__dict__.pop(_ATTR, None)


def prepare_kernels(model: torch.nn.Module) -> dict[str, str]:
    """Build the kernel data of every :class:`Int8Linear` in ``model`` now; returns ``{name: kernel}``."""
    from lightning_compress.core.quant.modules import Int8Linear

    return {name: _plan(m).kernel for name, m in model.named_modules() if isinstance(m, Int8Linear)}


_F32 = torch.float32
_is_compiling = torch.compiler.is_compiling
_jit_tracing_state = torch._C._get_tracing_state


def linear_forward(layer: Int8Linear, x: Tensor) -> Tensor | None:
    """The layer's output through its CPU kernel, or ``None`` for the caller's own (``int_mm``) path.

    Kept to a handful of attribute reads before the kernel: on the digits MLP's layers the whole
    float GEMM takes a few microseconds.
    """
    if x.dtype is not _F32 or not x.is_cpu:
        return None
    if _is_compiling():
        return _traced_forward(layer, x)
    if _jit_tracing_state() is not None:
        return None  # torch.jit.trace: the portable int_mm graph
    plan = _plan(layer)
    kernel = plan.kernel
    if kernel == "float" or kernel == "sparse":
        return _float_forward(plan, x)
    if kernel not in _U8S8:
        return None
    return _fbgemm_forward(plan, x, layer.in_features, layer.out_features)


def differentiable(layer: Int8Linear, x: Tensor) -> bool:
    """Whether ``layer``'s call on ``x`` is the dequantized ``F.linear`` itself (``"float"`` / ``"sparse"``).

    Autograd then differentiates it as it runs; every other kernel takes the straight-through
    gradients of :mod:`~lightning_compress.core.quant.straight_through`.
    """
    if x.dtype is not _F32 or not x.is_cpu:
        return False
    return _plan(layer).kernel in ("float", "sparse")


def _float_forward(plan: _Plan, x: Tensor) -> Tensor:
    """``x @ w_t + bias`` for the ``float`` kernel (``w_t``: the dequantized weight as ``[in, out]``).

    A call of at least the layer's crossover rows (:mod:`~lightning_compress.core.quant.crossover`)
    that autograd does not record takes fbgemm's route instead.
    """
    wt: Tensor = plan.weight  # type: ignore[assignment]
    x2 = x if x.dim() == 2 else x.reshape(-1, wt.shape[0])
    crossover = plan.crossover
    if crossover is not None and crossover[torch.get_num_threads() > 1] <= x2.shape[0] <= CROSSOVER_MAX_ROWS:
        bias = plan.bias
        if not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))):
            return _fbgemm_forward(plan, x, wt.shape[0], wt.shape[1])
    csr = plan.sparse
    if csr is not None and (plan.forced == "sparse" or use_csr(x2, plan.nnz)):
        out = csr_linear(csr, plan.bias, x2)
    else:
        out = torch.mm(x2, wt) if plan.bias is None else torch.addmm(plan.bias, x2, wt)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], wt.shape[1])


_FEW_ROWS = 16
"""Up to this many rows, the dynamic fbgemm route finds each row's ``max |x|`` from ``|x|`` (2 kernels, not 4)."""


def _fbgemm_forward(plan: _Plan, x: Tensor, in_features: int, out_features: int) -> Tensor:
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, in_features)
    if plan.kernel == "onednn_u8s8" and (
        plan.forced == "onednn_u8s8" or onednn_pays(x2.shape[0], in_features * out_features)
    ):
        out = _onednn_forward(plan, x2)
        return out if flat else out.reshape(*x.shape[:-1], out_features)
    qmax = plan.qmax
    if plan.mode == "static":
        # One reduction, while the input is still in the caches: an input inside the calibrated range
        # (the usual case) goes to the op as it is, one outside it (NaN and inf included: every
        # comparison with NaN is false) is clamped first, so that no code leaves [-qmax, qmax].
        lo, hi = torch.aminmax(x2)
        x_min, x_max, bound = float(lo), float(hi), plan.bound
        if -bound <= x_min and x_max <= bound:
            out = fbgemm_u8s8_mm(x2, plan.packed, plan.x_scale, qmax + 1)
        else:
            out = fbgemm_u8s8_mm(x2.clamp(-bound, bound), plan.packed, plan.x_scale, qmax + 1)
            if not (math.isfinite(x_min) and math.isfinite(x_max)):  # the op's rounding made them finite
                restore_nonfinite_rows_(out, x2)
    elif x2.shape[0] == 1:  # one row: its own range is the call's range (and the op adds the packed bias)
        out = linear_dynamic(x2, plan.packed, plan.reduce_range)
    else:
        # Each row divided by its max |x| (NaN for a row with a NaN, inf with an inf; an all-zero row
        # gets a tiny divisor and zeros), quantized by the op on the batch's range of [-1, 1]. Beyond
        # _FEW_ROWS rows the row max comes from `amax` and `amin` (no |x| temporary; `aminmax` along a
        # row was 8x slower, and `vector_norm(x, inf)`, the first version, 10x), and the rescale and
        # the bias are one pass (`addcmul`) after the packed bias comes off. These extra passes cost
        # 2-5 % of a 4096-wide MLP at batch 16 on one thread (benchmarks/int8_latency.py): the price
        # of a row's result not depending on the other rows of its batch.
        if x2.shape[0] <= _FEW_ROWS:  # |x| is a small temporary here, and two kernels fewer
            row_max = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
        else:
            high, low = x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True)
            row_max = torch.maximum(high, low.neg_()).clamp_min_(1e-30)
        out = linear_dynamic(torch.div(x2, row_max), plan.packed, plan.reduce_range)
        if plan.bias is None:
            out = out.mul_(row_max)
        else:  # the op added the packed bias b to the product p of the scaled rows: r (p + b - b) + b is
            # r p + b. In place (a second [M, N] buffer made such a pass up to 2x slower, 4096 wide),
            # except for an input that requires grad: in-place ops on it have no autograd
            if out.requires_grad:
                out = torch.addcmul(plan.bias, out - plan.bias, row_max)
            else:
                out = torch.addcmul(plan.bias, out.sub_(plan.bias), row_max, out=out)
    return out if flat else out.reshape(*x.shape[:-1], out_features)


def _onednn_forward(plan: _Plan, x2: Tensor) -> Tensor:
    """The ``int_mm`` path's computation with oneDNN's integer sums (bit-identical to it; ``onednn_linear``)."""
    pack = plan.onednn
    weight, scale, _, input_scale = plan.sources
    if pack is None:  # built on the first large call: a layer only ever called with few rows never holds it
        pack = plan.onednn = OnednnLinearPack(weight)
    static = plan.mode == "static"
    finite = True
    if static:
        x_scale = input_scale
        finite = math.isfinite(float(x2.sum()))  # checked before the GEMM, while the input is in the caches
        xq = quantize(x2, x_scale)
    else:
        xq, x_scale = quantize_rows(x2)
    out = pack.sums(xq).mul_(x_scale)
    bias = plan.bias
    if bias is None:
        out.mul_(scale)
    else:
        out = torch.addcmul(bias, out, scale, out=out)
    if not finite:  # rounding made a NaN / inf finite: put it back
        restore_nonfinite_rows_(out, x2)
    return out


def _traced_forward(layer: Int8Linear, x: Tensor) -> Tensor | None:
    """Under ``torch.compile``: the float kernel in-graph, fbgemm through an opaque custom op."""
    if torch.compiler.is_exporting():
        return None  # export: the portable int_mm graph of standard ops
    kernel = select_kernel(layer.in_features, layer.out_features, layer.mode, x.device)
    weight, scale, bias, input_scale = _sources(layer)
    if kernel == "float" or kernel == "sparse":  # in-graph dense (the CSR route is eager only)
        return F.linear(x, dequantize(weight, scale, axis=0), bias)
    if kernel not in _U8S8:
        return None
    _LAYERS[id(layer)] = weakref.ref(layer)
    lead = x.shape[:-1]
    fbgemm_available()  # probed outside the graph
    detached = None if bias is None else bias.detach()  # the op has no backward; int8 layers are not trained
    out = torch.ops.lightning_compress.int8_linear_fbgemm(
        x.reshape(-1, layer.in_features), weight, scale, detached, input_scale, layer.mode, id(layer)
    )
    return out.reshape(*lead, layer.out_features)


# Layers seen while compiling, by id, so that the compiled op reuses their packed weight (checked
# against the tensors it is given: on a miss it packs afresh, so a stale entry is never used).
_LAYERS: dict[int, weakref.ref[Any]] = {}


def _same(mine: tuple[Any, ...], given: tuple[Any, ...]) -> bool:
    """Whether the op was given the layer's own tensors (the bias arrives detached: compare storage)."""
    for a, b in zip(mine, given, strict=True):
        if (a is None) != (b is None):
            return False
        if a is not None and a is not b and (a.data_ptr() != b.data_ptr() or a.shape != b.shape):
            return False
    return True


@torch.library.custom_op("lightning_compress::int8_linear_fbgemm", mutates_args=())
def _int8_linear_fbgemm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    mode: str,
    key: int,
) -> Tensor:
    ref = _LAYERS.get(key)
    layer = ref() if ref is not None else None
    sources = (weight, weight_scale, bias, input_scale)
    plan = _plan(layer) if layer is not None and _same(_sources(layer), sources) else _Plan(mode, sources)
    return _fbgemm_forward(plan, x, weight.shape[1], weight.shape[0])


@_int8_linear_fbgemm.register_fake
def _(x: Tensor, weight: Tensor, *rest: Any) -> Tensor:  # the other arguments do not shape the output
    return x.new_empty(x.shape[0], weight.shape[0])
