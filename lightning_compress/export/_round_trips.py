"""Drop the float round trips ``DequantizeLinear -> QuantizeLinear`` that put int8 codes back on their own grid.

A residual block's input is quantized once at the block (``core/quant/residual.py``) and again by
its first convolution, on the same scale: ``DequantizeLinear(q, s, z1) -> QuantizeLinear(s, z2)
-> DequantizeLinear(s, z2)``. Where the codes ``q - z1`` fit the second quantization's range, that
is ``DequantizeLinear(q, s, z1)`` exactly (``((q - z1 + z2) - z2) * s``), so
:func:`drop_same_grid_round_trips` lets the second ``DequantizeLinear`` read ``(q, s, z1)`` and
removes the ``QuantizeLinear``. ONNX Runtime removes such pairs itself only when the zero points are
equal; ours differ where a ReLU moved the codes to the half grid (zero point 0, at most 127:
``export/_chain.py``) and the convolution's own quantization is on the signed grid (zero point 128).
Measured on resnet18: one float ``DequantizeLinear -> QuantizeLinear`` pass less per block.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_compress.export._chain import _consumers, _scalar_values, rebuild

__all__ = ["drop_same_grid_round_trips"]


def _code_range(producer: Any, scalars: dict[str, Any]) -> tuple[int, int]:
    """The uint8 codes ``producer`` can write: ``Min(., c)`` / ``Max(., c)`` with a scalar ``c`` bound them."""
    low, high = 0, 255
    if producer is not None and producer.op_type in ("Min", "Max") and len(producer.input) == 2:
        bound = scalars.get(producer.input[1])
        if bound is not None and bound.dtype == np.uint8:
            if producer.op_type == "Min":
                high = int(bound)
            else:
                low = int(bound)
    return low, high


def drop_same_grid_round_trips(proto: Any) -> int:
    """Rewire ``DQ(q, s, z1) -> Q(s, z2) -> DQ(s, z2)`` to ``DQ(q, s, z1)`` where exact, in place; returns how many.

    Only per-tensor uint8 quantizations with scalar scales of equal float32 value, whose
    ``QuantizeLinear`` only ``DequantizeLinear`` nodes on its own scale and zero point read (and is
    no graph output), and whose codes cannot saturate: ``q``'s range (``[0, 255]``, or the bound of
    the ``Min`` / ``Max`` that writes it) shifted by ``z2 - z1`` stays within ``[0, 255]``. The first
    ``DequantizeLinear`` goes too when nothing else reads it. The count is of ``QuantizeLinear`` nodes removed.
    """
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    scalars = _scalar_values(graph)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    removed = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) != 3 or q.output[0] in outputs:
            continue
        dq = producers.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 3:
            continue
        if not all(name in scalars for name in (dq.input[1], dq.input[2], q.input[1], q.input[2])):
            continue
        s1, z1, s2, z2 = (scalars[name] for name in (dq.input[1], dq.input[2], q.input[1], q.input[2]))
        if s1.dtype != np.float32 or s2.dtype != np.float32 or float(s1) != float(s2) or float(s1) <= 0:
            continue
        if z1.dtype != np.uint8 or z2.dtype != np.uint8:
            continue
        low, high = _code_range(producers.get(dq.input[0]), scalars)
        shift = int(z2) - int(z1)
        if low + shift < 0 or high + shift > 255:
            continue
        readers = consumers.get(q.output[0], [])
        same = [
            r
            for r in readers
            if r.op_type == "DequantizeLinear"
            and len(r.input) == 3
            and r.input[0] == q.output[0]
            and (s := scalars.get(r.input[1])) is not None
            and (z := scalars.get(r.input[2])) is not None
            and s.dtype == np.float32
            and float(s) == float(s2)
            and z.dtype == np.uint8
            and int(z) == int(z2)
        ]
        if not readers or len(same) != len(readers):
            continue
        for r in readers:
            r.input[:] = list(dq.input)
        dropped.add(id(q))
        removed += 1
        if all(id(n) in dropped or n is q for n in consumers.get(dq.output[0], [])) and dq.output[0] not in outputs:
            dropped.add(id(dq))  # nothing reads it any more (ONNX Runtime would still run it)
    if dropped:
        rebuild(graph, dropped)
    return removed


def max_pool_after_quantize(proto: Any) -> int:
    """Move each ``MaxPool`` that only a per-tensor ``QuantizeLinear`` reads past it, in place; returns how many.

    ``MaxPool -> QuantizeLinear(s, z)`` becomes ``QuantizeLinear(s, z) -> MaxPool`` on the uint8
    codes: quantization is monotone, so the maximum of the codes is the code of the maximum (padding
    never wins a maximum in either), the same integers. The float tensor before the pooling then
    goes straight into the quantization, where :func:`~lightning_compress.export._chain.relu_after_quantize`
    can take a ``Relu`` onto the codes too (resnet's stem: ``Relu -> MaxPool`` between two
    ``QLinearConv`` nodes, in float until then).
    """
    graph = proto.graph
    consumers = _consumers(graph)
    scalars = _scalar_values(graph)
    outputs = {o.name for o in graph.output}
    moved: dict[int, Any] = {}  # QuantizeLinear -> its MaxPool, which now follows it
    for pool in graph.node:
        if pool.op_type != "MaxPool" or len(pool.output) != 1 or pool.output[0] in outputs:
            continue
        readers = consumers.get(pool.output[0], [])
        if len(readers) != 1:
            continue
        q = readers[0]
        if q.op_type != "QuantizeLinear" or len(q.input) != 3 or q.input[0] != pool.output[0]:
            continue
        zero, scale = scalars.get(q.input[2]), scalars.get(q.input[1])
        if zero is None or scale is None or zero.dtype != np.uint8 or scale.dtype != np.float32:
            continue
        source, codes = pool.input[0], q.output[0]
        q.input[0], q.output[0] = source, f"{codes}_before_pool"
        pool.input[0], pool.output[0] = q.output[0], codes
        moved[id(q)] = pool
    if moved:
        rebuild(graph, {id(pool) for pool in moved.values()}, moved)
    return len(moved)
