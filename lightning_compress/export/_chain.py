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

Measured on the digits MLP (static, batch 64, 1 thread, AMD EPYC AVX2): 125 us -> 102 us per call,
against 95 us for ONNX Runtime's own ``quantize_static`` of the float model. Both run after the
export, on the ONNX graph (`docs/deploying.rst`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["int32_gemm_bias", "relu_after_quantize"]

_INT32_MAX = 2**31 - 1


def _consumers(graph: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _scalar(graph: Any, name: str) -> bool:
    """Whether ``name`` is a scalar initializer or the output of a scalar ``Constant``."""
    for init in graph.initializer:
        if init.name == name:
            return len(init.dims) == 0
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return all(len(a.t.dims) == 0 for a in node.attribute if a.name == "value")
    return False


def _per_tensor_quantize(graph: Any, node: Any, source: str) -> bool:
    """Whether ``node`` quantizes ``source`` with an explicit scalar zero point."""
    return (
        node.op_type == "QuantizeLinear"
        and node.input[0] == source
        and len(node.input) == 3
        and _scalar(graph, node.input[2])
    )


def relu_after_quantize(proto: Any) -> int:
    """Rewrite, in place, each ``Relu`` read only by per-tensor ``QuantizeLinear`` nodes; returns how many.

    ``Relu -> QuantizeLinear(scale, zero)`` becomes ``QuantizeLinear(scale, zero) -> Max(., zero)``:
    the same integers, with the float ReLU gone from between the layers.
    """
    from onnx import helper

    graph = proto.graph
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    moved: dict[int, Any] = {}  # QuantizeLinear node -> the Max that follows it
    dropped: set[int] = set()
    for node in graph.node:
        if node.op_type != "Relu" or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if not users or not all(_per_tensor_quantize(graph, u, node.output[0]) for u in users):
            continue
        for q in users:
            q.input[0] = node.input[0]
            clipped = f"{q.output[0]}_relu"
            for reader in consumers.get(q.output[0], []):
                reader.input[:] = [clipped if i == q.output[0] else i for i in reader.input]
            if q.output[0] in outputs:
                continue  # never: a QuantizeLinear output is read by its DequantizeLinear
            moved[id(q)] = helper.make_node("Max", [q.output[0], q.input[2]], [clipped], name=f"{clipped}_max")
        dropped.add(id(node))
    if not dropped:
        return 0
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        nodes.append(node)
        if id(node) in moved:
            nodes.append(moved[id(node)])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(dropped)


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
        if not np.all(np.abs(steps) <= _INT32_MAX):
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
