"""The CSR route of the ``"sparse"`` kernel: a pruned int8 Linear multiplied by only its non-zero weights.

A CPU int8 Linear too small for int8 to pay computes in float from its cached dequantized weight
(the ``"float"`` kernel of :mod:`~lightning_compress.core.quant.kernels`). When that weight is mostly
zeros (pruned), the layer also keeps it as a sparse CSR matrix and, for a batch large enough, computes
``bias + W_csr @ x.T`` with torch's sparse kernel (MKL's on x86) instead of the dense GEMM. Where it
is used is a rule measured on an AMD EPYC with AVX-512 VNNI (``benchmarks/sparse_linear.py``):

* at least :data:`SPARSE_MIN_IN` (256) inputs and :data:`SPARSE_MIN_OUT` (64) outputs, and at
  most :data:`SPARSE_MAX_DENSITY` (10 %, rounded up) of the weights non-zero with
  :data:`SPARSE_WIDE_OUT` (128) outputs or more, 5 % with 64-127. Bare CSR product over
  ``nn.Linear`` at 32-256 rows (dense ``float`` kernel 0.85-1.1x): with 10 % left, 0.53-0.75x on
  300x300, 384x384, 256x1024, 300x256, 512x128, 784x128 and 784x256, 0.78-0.90x on 300x200, but
  0.74-1.17x on 300x100 and 0.83-1.05x on 1024x64 (not reliably faster); with 5 % left, 0.31-0.57x
  on 784x256, 0.52-0.58x on 300x100 at 128-256 rows (0.66-1.26x at 32-64: the call rule below)
  and 0.64-0.71x on 1024x64, while 512x32 was 1.03-1.31x and 64-input layers 0.79-1.6x;
* at least :data:`SPARSE_MIN_ROWS` (32) rows in the call and at least :data:`SPARSE_MIN_WORK`
  (131,072) multiply-adds in the CSR product (rows x non-zero weights): at one row the CSR product
  took 1.2-2.5x the dense one; on 300x100 with 5 % left (1,500 weights) the layer ran in 0.92x / 0.79x
  of ``nn.Linear`` at 128 / 256 rows but 1.00-1.05x at 64 (a fixed cost per call: the transposes, the
  finiteness check, one more dispatch), while 300x300 with 5 % left ran in 0.46x at 64 rows and
  784x256 with 10 % left in 0.72-0.75x at 32 rows (the bare CSR product);
* one torch thread (``torch.get_num_threads() == 1``): with two threads the dense GEMM shares the
  work and the sparse one measured 1.7-2.1x slower on the 300x100 layer;
* no autograd through the input (a dense product then, whose backward is the usual one).

So the choice is a function of the layer's weight, the batch's row count and the thread setting:
the same in every run on the same machine with the same settings. The result equals the dense
product up to float32 rounding (the sums skip the zeros, in another order); a non-finite input
gives a non-finite output row as the dense product does (a zero weight times ``inf`` or ``NaN`` is
``NaN`` there, and skipped here, so it is put back).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from lightning_compress.core.quant.primitives import restore_nonfinite_rows_

__all__ = [
    "SPARSE_MAX_DENSITY",
    "SPARSE_MIN_IN",
    "SPARSE_MIN_ROWS",
    "SPARSE_MIN_WORK",
    "SPARSE_MIN_OUT",
    "SPARSE_WIDE_OUT",
    "csr_linear",
    "sparse_pays",
    "to_csr",
    "use_csr",
]

SPARSE_MAX_DENSITY = 0.1
"""A layer with at least :data:`SPARSE_WIDE_OUT` outputs keeps a CSR copy when at most this fraction of
its int8 weights is non-zero (rounded up); with :data:`SPARSE_MIN_OUT` to :data:`SPARSE_WIDE_OUT`
outputs, when at most half of it is."""

SPARSE_MIN_IN = 256
"""Fewer inputs than this: never (the CSR product of 64-input layers was not faster at 95 % zeros)."""

SPARSE_MIN_OUT = 64
"""Fewer outputs than this: never (512x32 at 95 % zeros was slower through CSR)."""

SPARSE_WIDE_OUT = 128
"""From this many outputs on, 90 % zeros suffice; below it, 95 % are needed."""

_HAS_MKL: bool = torch.backends.mkl.is_available()  # type: ignore[no-untyped-call]  # torch's sparse CPU kernel

SPARSE_MIN_ROWS = 32
"""A call uses the CSR product only from this many rows (leading dims flattened) on."""

SPARSE_MIN_WORK = 1 << 17
"""... and only when its rows times the layer's non-zero weights reach this many."""


def sparse_pays(weight: Tensor) -> bool:
    """Whether a ``"float"``-kernel layer with this ``[out, in]`` int8 weight also computes through CSR.

    Example:
        >>> w = torch.zeros(128, 600, dtype=torch.int8)
        >>> w[:, :60] = 1  # 10 % non-zero
        >>> sparse_pays(w), sparse_pays(w[:, :300]), sparse_pays(w[:100])  # 128 x 600, 128 x 300 (20 %), 100 x 600
        (True, False, False)
        >>> w[:, 30:60] = 0  # 5 % non-zero
        >>> sparse_pays(w[:100])  # 100 outputs
        True
    """
    if weight.dim() != 2 or weight.device.type != "cpu":
        return False
    out_features, in_features = weight.shape
    if in_features < SPARSE_MIN_IN or out_features < SPARSE_MIN_OUT:
        return False
    density = SPARSE_MAX_DENSITY if out_features >= SPARSE_WIDE_OUT else SPARSE_MAX_DENSITY / 2
    return _HAS_MKL and int(torch.count_nonzero(weight)) <= math.ceil(density * weight.numel())


def to_csr(weight: Tensor) -> Tensor:
    """The float ``[out, in]`` weight as a CSR matrix (torch's beta-state warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return weight.detach().to_sparse_csr()


def use_csr(x2: Tensor, nnz: int) -> bool:
    """Whether a call on the ``[M, K]`` input ``x2`` takes the CSR product of ``nnz`` non-zero weights.

    Example:
        >>> use_csr(torch.zeros(64, 300), 1500), use_csr(torch.zeros(128, 300), 1500)  # (see the module docstring)
        (False, True)
    """
    rows = x2.shape[0]
    return (
        rows >= SPARSE_MIN_ROWS
        and rows * nnz >= SPARSE_MIN_WORK
        and torch.get_num_threads() == 1
        and not (x2.requires_grad and torch.is_grad_enabled())
    )


def csr_linear(csr: Tensor, bias: Tensor | None, x2: Tensor) -> Tensor:
    """``x2 @ W.T + bias`` as ``(bias[:, None] + W_csr @ x2.T).T``, contiguous ``[M, N]``.

    Example:
        >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
        >>> csr_linear(to_csr(w), torch.tensor([0.5, 0.0]), torch.tensor([[1.0, 3.0]])).tolist()
        [[6.5, 1.0]]
    """
    xt = x2.t()
    out_t = torch.mm(csr, xt) if bias is None else torch.addmm(bias[:, None], csr, xt)
    out = out_t.t().contiguous()
    if not math.isfinite(float(x2.sum())):  # skipped zeros would hide a non-finite input
        restore_nonfinite_rows_(out, x2)
    return out
