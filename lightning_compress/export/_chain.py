"""Rewrites of the exported ONNX graph that let ONNX Runtime chain its int8 kernels.

ONNX Runtime fuses ``DequantizeLinear -> Gemm -> QuantizeLinear`` into one ``QGemm`` with a
quantized output, so that the next static layer reads int8 directly, but only when nothing stands
between the ``Gemm`` and the ``QuantizeLinear``. In the exported graph two things do:

* **the ReLU** before the next layer's input quantization. ``QuantizeLinear`` is monotone and maps 0
  to its zero point, so ``QuantizeLinear(Relu(x)) == Max(QuantizeLinear(x), zero_point)`` exactly:
  :func:`relu_after_quantize` moves the ReLU past the quantization, onto the 8-bit tensor.
* **the bias**, added in float after the ``Gemm`` (a float ``C`` input keeps ONNX Runtime from fusing
  at all). :func:`int32_gemm_bias` gives the ``Gemm`` its bias as an int32 tensor on the grid of the
  product (scale ``input_scale * weight_scale``, per output channel), the form ONNX Runtime's own
  quantizer writes. That rounds each bias entry by at most half a product step (about
  ``1 / 32000`` of the output's int8 step), the one difference it makes to the outputs.

A third, :func:`requantize_on_one_grid`, hands one ``QLinearConv``'s codes to the next as integers
where the two share a grid (``core/quant/grids.py``). All run after the export, on the ONNX graph;
:func:`int8_weights_where_safe` then gives the layers
that read only the non-negative half of the grid their int8 weights back. What they measured is in
the *Deploying* page of the docs (``benchmarks/onnx_export.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_compress.core.quant.primitives import INT32_MAX

__all__ = ["int32_gemm_bias", "int8_weights_where_safe", "rebuild", "relu_after_quantize", "requantize_on_one_grid"]


def _consumers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _scalar_values(graph: Any) -> dict[str, Any]:
    """``{name: value}`` of every scalar initializer and scalar ``Constant`` output (one pass over the graph)."""
    from onnx import numpy_helper

    found: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            tensors = [a.t for a in node.attribute if a.name == "value"]
            if tensors and len(tensors[0].dims) == 0:
                found[node.output[0]] = numpy_helper.to_array(tensors[0])
    for init in graph.initializer:  # an initializer wins over a Constant of the same name, as it did
        if len(init.dims) == 0:
            found[init.name] = numpy_helper.to_array(init)
        else:
            found.pop(init.name, None)
    return found


def _quantizes(scalars: dict[str, Any], node: Any, source: str) -> bool:
    """Whether ``node`` quantizes ``source`` per tensor, with an explicit scalar zero point."""
    return (
        node.op_type == "QuantizeLinear"
        and node.input[0] == source
        and len(node.input) == 3
        and node.input[2] in scalars
    )


def rebuild(graph: Any, dropped: set[int], after: dict[int, Any] | None = None) -> None:
    """Rewrite ``graph.node`` in order, without the nodes in ``dropped`` (ids), each of ``after`` after its key."""
    follow = after or {}
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        nodes.append(node)
        if id(node) in follow:
            nodes.append(follow[id(node)])
    del graph.node[:]
    graph.node.extend(nodes)


HALF_GRID = "lc_relu_half_grid"
"""Name stem of the constants of :func:`relu_after_quantize`'s uint8 form (zero point 0, top 127)."""


def relu_after_quantize(proto: Any) -> int:
    """Move each ``Relu`` that a per-tensor ``QuantizeLinear`` reads past it, in place; returns how many moved.

    ``Relu -> QuantizeLinear(scale, zero)`` becomes ``QuantizeLinear(scale, zero) -> Max(., zero)``:
    the same integers, with the float ReLU gone from between the layers. The export's own activation
    form (uint8, zero point 128: the signed grid ``-128..127``) becomes the non-negative half of that
    grid instead, ``QuantizeLinear(scale, 0) -> Min(., 127)`` with its ``DequantizeLinear`` at zero
    point 0: the same values, and uint8 inputs below 128, which ONNX Runtime's u8 x s8 kernels
    multiply without saturating where the CPU has no VNNI (see :func:`int8_weights_where_safe`).
    A ``Relu`` that a float node also reads stays for that node.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    consumers = _consumers(graph)
    scalars = _scalar_values(graph)
    outputs = {o.name for o in graph.output}
    after: dict[int, Any] = {}  # QuantizeLinear node -> the node that follows it
    dropped: set[int] = set()
    half_grid = False
    for node in graph.node:
        if node.op_type != "Relu":
            continue
        users = consumers.get(node.output[0], [])
        quantizers = [u for u in users if _quantizes(scalars, u, node.output[0])]
        for q in quantizers:
            readers = consumers.get(q.output[0], [])
            if q.output[0] in outputs or not readers:
                continue
            zero = scalars[q.input[2]]
            clipped = f"{q.output[0]}_relu"
            half = (
                zero.dtype == np.uint8
                and int(zero) == 128
                and all(r.op_type == "DequantizeLinear" and r.input[0] == q.output[0] and r.input[2] == q.input[2]
                        for r in readers)
            )  # fmt: skip
            if half:
                q.input[2] = f"{HALF_GRID}_zero"
                for r in readers:
                    r.input[2] = f"{HALF_GRID}_zero"
                after[id(q)] = helper.make_node("Min", [q.output[0], f"{HALF_GRID}_top"], [clipped], name=clipped)
                half_grid = True
            else:
                after[id(q)] = helper.make_node("Max", [q.output[0], q.input[2]], [clipped], name=clipped)
            for r in readers:
                r.input[:] = [clipped if i == q.output[0] else i for i in r.input]
            q.input[0] = node.input[0]
        if node.output[0] not in outputs and len(quantizers) == len(users) and all(id(q) in after for q in users):
            dropped.add(id(node))
    if not after:
        return 0
    if half_grid:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(0, dtype=np.uint8), f"{HALF_GRID}_zero"),
                numpy_helper.from_array(np.array(127, dtype=np.uint8), f"{HALF_GRID}_top"),
            ]
        )
    rebuild(graph, dropped, after)
    return len(after)


def requantize_on_one_grid(proto: Any) -> int:
    """Replace ``DequantizeLinear(q, s, 128) -> QuantizeLinear(s, 0)`` on one scale by integer ops, in place.

    After :func:`relu_after_quantize`, a static convolution whose output grid is the next one's
    input grid (:mod:`lightning_compress.core.quant.grids`) is followed by a float round trip that
    only takes the non-negative half: ``clamp(q - 128, 0, 255)``, written ``Max(q, 128) - 128`` on
    the uint8 codes (exact), so that ONNX Runtime runs the two ``QLinearConv`` nodes with nothing
    but two integer ops between them. Where ``q`` is a ``QuantizeLinear(x, s, 128)`` that nothing
    else reads, that quantization itself moves to the half grid instead (``QuantizeLinear(x, s, 0)``,
    whose ``Min(., 127)`` follows: ``clamp(round(x / s), 0, 127)`` either way), and only that ``Min``
    stands between the two convolutions. Returns how many pairs it replaced.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    scalars = _scalar_values(graph)
    outputs = {o.name for o in graph.output}
    replaced: dict[int, list[Any]] = {}
    dropped: set[int] = set()
    shifted = False
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) != 3 or q.input[2] != f"{HALF_GRID}_zero":
            continue
        dq = producers.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 3 or dq.output[0] in outputs:
            continue
        if len(consumers.get(dq.output[0], [])) != 1:
            continue
        zero, s_in, s_out = (scalars.get(name) for name in (dq.input[2], dq.input[1], q.input[1]))
        if zero is None or s_in is None or s_out is None or zero.dtype != np.uint8 or int(zero) != 128:
            continue
        if s_in.dtype != np.float32 or s_out.dtype != np.float32 or float(s_in) != float(s_out) or float(s_in) <= 0:
            continue
        dropped.add(id(dq))
        source = producers.get(dq.input[0])
        if _requantizes_alone(source, dq, scalars, consumers, outputs):
            assert source is not None
            # Q(x, s, 128) -> [Max, Sub] is Q(x, s, 0) on the half grid (then the Min(., 127) that follows)
            source.input[2] = f"{HALF_GRID}_zero"
            source.output[0] = q.output[0]
            replaced[id(q)] = []
            continue
        shift, top = f"{HALF_GRID}_shift", f"{q.output[0]}_top"
        replaced[id(q)] = [
            helper.make_node("Max", [dq.input[0], shift], [top], name=top),
            helper.make_node("Sub", [top, shift], [q.output[0]], name=f"{q.output[0]}_shifted"),
        ]
        shifted = True
    if not replaced:
        return 0
    if shifted:
        graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), f"{HALF_GRID}_shift"))
    nodes = []
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replaced)


def _requantizes_alone(
    source: Any, dq: Any, scalars: dict[str, Any], consumers: dict[str, list[Any]], outputs: set[str]
) -> bool:
    """Whether ``source`` is a ``QuantizeLinear(x, s, 128)`` on ``dq``'s scale that only ``dq`` reads."""
    if source is None or source.op_type != "QuantizeLinear" or len(source.input) != 3:
        return False
    if source.output[0] in outputs or [id(n) for n in consumers.get(source.output[0], [])] != [id(dq)]:
        return False
    zero, scale, dq_scale = (scalars.get(name) for name in (source.input[2], source.input[1], dq.input[1]))
    if zero is None or scale is None or dq_scale is None or zero.dtype != np.uint8 or int(zero) != 128:
        return False
    return scale.dtype == np.float32 and float(scale) == float(dq_scale)


def int8_weights_where_safe(proto: Any) -> int:
    """Store as int8 (zero point 0) each uint8 weight (zero point 128) whose layers read only half-grid inputs.

    A weight stored as uint8 keeps ONNX Runtime on its u8 x u8 kernels, which never saturate but run
    slower than u8 x s8 on x86 without VNNI; u8 x s8 saturates only when a uint8 input is 128 or more.
    After :func:`relu_after_quantize` an input on the half grid (``Min(., 127)``) never is, so a
    ``Gemm`` or ``Conv`` that reads only such inputs gets its weight back as int8: ``w - 128`` with
    zero point 0, the same values. Returns how many weights changed.
    """
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    uses = {name: len(readers) for name, readers in consumers.items()}

    def half_grid_input(layer: Any) -> bool:
        dq = producers.get(layer.input[0])
        source = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return source is not None and source.op_type == "Min" and source.input[1] == f"{HALF_GRID}_top"

    changed = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        weight, zero = inits.get(node.input[0]), inits.get(node.input[2])
        layers = consumers.get(node.output[0], [])
        if weight is None or zero is None or uses.get(weight.name) != 1:
            continue
        w, z = numpy_helper.to_array(weight), numpy_helper.to_array(zero)
        if w.dtype != np.uint8 or z.dtype != np.uint8 or not np.all(z == 128):
            continue
        if not layers or not all(
            n.op_type in ("Gemm", "Conv") and n.input[1] == node.output[0] and half_grid_input(n) for n in layers
        ):
            continue
        weight.CopyFrom(numpy_helper.from_array((w.astype(np.int16) - 128).astype(np.int8), weight.name))
        node.input[2] = f"{weight.name}_zero_int8"  # the exporter shares one zero-point tensor between layers
        graph.initializer.append(numpy_helper.from_array(np.zeros(z.shape, dtype=np.int8), node.input[2]))
        changed += 1
    return changed


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def int32_gemm_bias(proto: Any) -> int:
    """Rewrite, in place, each static ``Gemm -> Add(bias)`` into a ``Gemm`` with an int32 bias; returns how many.

    Only a ``Gemm`` of two ``DequantizeLinear`` inputs with initializer scales (the QDQ form of a static
    Linear: a scalar input scale, a weight scale per output channel or one), whose output only an
    ``Add`` of a 1-d float initializer reads. A bias that the product's grid cannot hold (a zero
    weight scale, or more than int32 steps) keeps its float ``Add``.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    replaced: set[str] = set()
    added: list[Any] = []
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) != 2 or node.output[0] in outputs:
            continue
        if _attribute(node, "transA", 0) or _attribute(node, "alpha", 1.0) != 1.0:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        users = consumers.get(node.output[0], [])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if len(users) != 1 or users[0].op_type != "Add" or users[0].input[0] != node.output[0]:
            continue
        add = users[0]
        bias_init, sx_init, sw_init = inits.get(add.input[1]), inits.get(dq_x.input[1]), inits.get(dq_w.input[1])
        if bias_init is None or sx_init is None or sw_init is None or len(sx_init.dims) != 0:
            continue
        bias = numpy_helper.to_array(bias_init)
        n_out = bias.shape[0] if bias.ndim == 1 else -1
        sw = numpy_helper.to_array(sw_init).astype(np.float64).reshape(-1)
        if bias.dtype != np.float32 or n_out < 1 or sw.size not in (1, n_out):
            continue
        scale = (float(numpy_helper.to_array(sx_init)) * sw * np.ones(n_out)).astype(np.float32)
        if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            continue
        steps = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if not np.all(np.abs(steps) <= INT32_MAX):
            continue
        base = f"{bias_init.name}_int32"
        graph.initializer.extend(
            [
                numpy_helper.from_array(steps.astype(np.int32), base),
                numpy_helper.from_array(scale, f"{base}_scale"),
                numpy_helper.from_array(np.zeros(n_out, dtype=np.int32), f"{base}_zero"),
            ]
        )
        added.append(
            helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero"], [f"{base}_dq"], axis=0)
        )
        node.input.append(f"{base}_dq")
        node.output[0] = add.output[0]
        dropped.add(id(add))
        replaced.add(bias_init.name)
    if not dropped:
        return 0
    nodes = added + [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in used or i.name in outputs]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(dropped)
