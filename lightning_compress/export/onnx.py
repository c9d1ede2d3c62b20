"""``export_onnx``: write a float, pruned or int8 model as an ONNX file that ONNX Runtime runs.

The model is exported with ``torch.onnx.export(dynamo=True)``. For the duration of the export every
int8 layer is swapped for its export form (:mod:`lightning_compress.export.registry`), whose custom
operators are written as the int8 ONNX patterns ONNX Runtime fuses into its fast kernels
(:mod:`lightning_compress.export.translate`); the int8 weights stay int8 initializers. The model
is put back exactly as it was afterwards, on error too. The file is checked with
``onnx.checker``, run once in ONNX Runtime when it is installed, and written atomically.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_compress.core.files import atomic_write
from lightning_compress.errors import check_choice, config_error
from lightning_compress.export import _deps
from lightning_compress.export._chain import (
    int8_weights_where_safe,
    int32_gemm_bias,
    relu_after_quantize,
    requantize_on_one_grid,
)
from lightning_compress.export._cpu import auto_weight_dtype
from lightning_compress.export._inputs import batch_dynamic_shapes, ort_feed, split_inputs
from lightning_compress.export._rewrite import foldable_conv_weights
from lightning_compress.export._round_trips import drop_same_grid_round_trips, max_pool_after_quantize
from lightning_compress.export.forms import WEIGHT_DTYPES, ExportOptions
from lightning_compress.export.registry import export_forms

__all__ = ["export_onnx", "onnx_bytes"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise config_error("path", "a non-empty file path (str or os.PathLike)", path)
    text = os.fspath(path)
    if os.path.isdir(text):
        raise config_error("path", "a file path, not a folder", text)
    return str(text)


def onnx_bytes(module: nn.Module, example_inputs: Any, *, weight_dtype: str = "auto", check: bool = True) -> bytes:
    """The serialized ONNX model that :func:`export_onnx` writes (see there for the arguments)."""
    check_choice("weight_dtype", weight_dtype, ("auto", *WEIGHT_DTYPES))
    chosen = weight_dtype == "auto"
    if chosen:
        weight_dtype = auto_weight_dtype()
    onnx = _deps.require("onnx")
    _deps.require("onnxscript")
    from lightning_compress.export.translate import translation_table

    args, kwargs = split_inputs(example_inputs)
    dynamic_shapes = batch_dynamic_shapes(args, kwargs)
    options = ExportOptions(weight_dtype=weight_dtype)
    with _eval_mode(module), export_forms(module, options) as model, torch.no_grad():
        chatter = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="# The axis name")
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(),
                external_data=False,
                optimize=True,
                verbose=False,
            )
    assert program is not None
    proto = program.model_proto
    foldable_conv_weights(proto)
    int32_gemm_bias(proto)  # then ONNX Runtime chains static layers' int8 kernels (export/_chain.py)
    max_pool_after_quantize(proto)  # (export/_round_trips.py), so that a ReLU before the pooling moves too
    relu_after_quantize(proto)
    requantize_on_one_grid(proto)
    drop_same_grid_round_trips(proto)  # a residual block's input, quantized twice on one grid (_round_trips.py)
    if chosen:  # uint8 weights only where an int8 one could saturate
        int8_weights_where_safe(proto)
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    if check and _deps.available("onnxruntime"):
        _run_once(data, args, kwargs)
    return data


def _run_once(data: bytes, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Load and run the model in ONNX Runtime, so that a file it cannot run is never written."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    session.run(None, ort_feed([i.name for i in session.get_inputs()], args, kwargs))


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    weight_dtype: str = "auto",
    check: bool = True,
) -> None:
    """Write ``module`` as an ONNX model that ONNX Runtime runs: float, pruned or int8 (every mode).

    The int8 layers (:class:`~lightning_compress.core.quant.modules.Int8Linear`,
    :class:`~lightning_compress.core.quant.modules.Int8Conv2d`, the int8 layers inside
    ``nn.TransformerEncoder``) keep their int8 weights and scales in the file, as the node patterns
    ONNX Runtime fuses into its int8 kernels: a dynamic Linear becomes
    ``DynamicQuantizeLinear -> MatMulInteger`` (run as ``DynamicQuantizeMatMul``), a static one
    the QDQ form with the calibrated scale around a ``Gemm`` (run as ``QGemm``), weight-only layers
    ``DequantizeLinear`` on the int8 weight, a static convolution the QDQ form of its input, int8
    weight and output (run as ``QLinearConv``), other convolutions ``Cast -> Mul`` on the int8
    weight (folded into a float weight when ONNX Runtime loads the file: float compute at float
    speed, as in PyTorch).
    The first dimension of every input is a dynamic batch dimension; graph inputs are named after
    the model's ``forward`` parameters (the keys of a dict of keyword inputs).

    Args:
        module: the model (float32); it is exported in eval mode and left as it was.
        path: the ``.onnx`` file to write (atomically; its folder is created).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (``model(**inputs)``), with a batch of at least 2.
        weight_dtype: how int8 weights are stored: ``"int8"``, or ``"uint8"`` (the int8 values plus
            128, zero point 128: the same values, run by ONNX Runtime's u8 x u8 kernels, which avoid
            the int16 saturation of its u8 x s8 kernels on x86 CPUs without VNNI). ``"auto"``
            (default) picks ``"uint8"`` on an x86 CPU without VNNI and ``"int8"`` elsewhere, for
            the CPU that exports: name it when the file is for another CPU. The trade-off, measured
            on an AVX2 CPU (:doc:`/deploying`): int8 weights run as fast as ONNX Runtime's own
            quantizer, with its accuracy (it saturates the same way), but on a random-init MLP
            they reached a relative error of 0.07 (dynamic) to 0.16 (static) and 80-94 % top-1
            agreement with the PyTorch int8 model, against 0.006-0.009 and 98-100 % with uint8,
            which costs up to 1.4x in speed on small layers.
        check: run the written model once in ONNX Runtime (when installed) before writing it.

    Raises:
        ImportError: ``onnx`` / ``onnxscript`` are missing (``pip install "lightning-compress[export]"``).
        CompressionConfigError: bad ``path``, ``example_inputs`` or ``weight_dtype``.
        UnsupportedLayerError: an int8 layer has no exporter (the message names it).

    Example:
        >>> import tempfile, os, torch
        >>> from torch import nn
        >>> from lightning_compress.core.quant.convert import quantize
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> sorted(quantize(model, "dynamic").converted.values())
        ['dynamic', 'dynamic']
        >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
        >>> export_onnx(model, path, torch.randn(2, 8))  # doctest: +SKIP
    """
    target = _check_path(path)
    data = onnx_bytes(module, example_inputs, weight_dtype=weight_dtype, check=check)
    atomic_write(target, lambda f: f.write(data))
