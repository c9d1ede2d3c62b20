"""Static int8 convolutions in PyTorch: the integer form against the float form, and against ONNX Runtime.

A static float32 ``Int8Conv2d`` computes on the integer codes of its input and weight
(``Int8Conv2d._integer_forward``: exact sums, the int32 bias count, one requantization, as ONNX
Runtime's ``QLinearConv``), its sums from oneDNN's int8 convolution where that is exact
(``core.quant.onednn``; VNNI / AMX CPUs) and from ``F.conv2d`` on the codes elsewhere; the float
form, which ``torch.compile`` / ``torch.export`` graphs keep, multiplies the dequantized input by
the dequantized weight. Side by side in one run, for torchvision resnet18 (random init, batch norm
statistics from a training-mode pass, folded; static, int8 residual additions):

* PyTorch eager milliseconds per call of float32, the static model in each form (oneDNN sums, and
  ``F.conv2d`` sums, ``static_integer_fconv``), both in contiguous and in channels-last memory
  format, and the dynamic model (batch 4 at 112x112, interleaved rounds, medians);
* the relative error of each form against the model's ONNX Runtime export (``export_onnx``), on
  several seeds (16 images of 48x48, calibrated on them, as ``tests/export/test_export_models.py``).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/static_conv_forms.py
    python benchmarks/static_conv_forms.py --smoke --out /tmp   # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.conv2d import Int8Conv2d
from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.onednn import onednn_conv_available, use_onednn_conv

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent))
from _cpu import cpu_header  # noqa: E402
from _timing import interleaved  # noqa: E402


@contextlib.contextmanager
def float_form() -> Iterator[None]:
    """Every ``Int8Conv2d`` takes the float form (the dequantized input times the dequantized weight)."""
    saved = Int8Conv2d._integer_forward
    Int8Conv2d._integer_forward = lambda self, x: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Int8Conv2d._integer_forward = saved  # type: ignore[method-assign]


def trained_resnet18(seed: int, images: torch.Tensor) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model.train()(images)  # batch norm statistics of the data, as after training
    return model.eval()


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    ref = want.numpy()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def agreement(seeds: int, size: int) -> list[dict[str, Any]]:
    import onnxruntime as ort  # type: ignore[import-untyped]

    from lightning_compress import export_onnx

    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        x = torch.randn(16, 3, size, size)
        model = trained_resnet18(seed, x)
        quantize(model, "static", calibration=[x])
        path = os.path.join(tempfile.mkdtemp(), "resnet18.onnx")
        export_onnx(model, path, x[:2])
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            integer = model(x)
            with float_form():
                plain = model(x)
        rows.append({"seed": seed, "integer_vs_ort": rel_err(got, integer), "float_vs_ort": rel_err(got, plain)})
        row = rows[-1]
        print(f"  seed {seed}: integer form {row['integer_vs_ort']:.4f}, float form {row['float_vs_ort']:.4f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    size, batch, rounds, seeds = (32, 2, 2, 1) if args.smoke else (112, 4, args.rounds, args.seeds)
    header = (
        f"CPU: {cpu_header()}; torch threads: {torch.get_num_threads()}; torch {torch.__version__};"
        f" oneDNN int8 convolution: {'used' if onednn_conv_available() else 'not exact here, not used'}"
    )
    print(header)
    x = torch.randn(batch, 3, size, size)
    net = trained_resnet18(0, x)
    static, dynamic = copy.deepcopy(net), copy.deepcopy(net)
    quantize(static, "static", calibration=[x])
    quantize(dynamic, "dynamic")

    def float_form_call() -> torch.Tensor:
        with float_form():
            return static(x)

    def fconv_call() -> torch.Tensor:
        with use_onednn_conv(False):
            return static(x)

    # The same models and input in channels-last memory format (the layout oneDNN computes in).
    cl = torch.channels_last
    x_cl, net_cl = x.contiguous(memory_format=cl), copy.deepcopy(net).to(memory_format=cl)
    static_cl = copy.deepcopy(static).to(memory_format=cl)
    with torch.no_grad():
        ms = interleaved(
            {"float32": lambda: net(x), "float32_channels_last": lambda: net_cl(x_cl),
             "static_integer": lambda: static(x), "static_integer_channels_last": lambda: static_cl(x_cl),
             "static_integer_fconv": fconv_call, "static_float_form": float_form_call,
             "dynamic": lambda: dynamic(x)},
            rounds, 1,
        )  # fmt: skip
    ms = {k: v * 1e3 for k, v in ms.items()}
    print("  ms:", {k: round(v, 2) for k, v in ms.items()})
    rows = agreement(seeds, 16 if args.smoke else 48)
    result = {"header": header, "batch": batch, "size": size, "ms": ms, "agreement": rows}
    stem = "static_conv_forms" + ("_smoke" if args.smoke else "")

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    md = [
        "# Static int8 convolutions: integer form vs float form (python benchmarks/static_conv_forms.py)",
        "",
        header,
        "",
        f"PyTorch eager, resnet18, batch {batch} at {size}x{size}, medians of {rounds} interleaved rounds:",
        "",
        "| variant | ms | / float32 |",
        "|---|---|---|",
        *[f"| {k} | {v:.2f} | {v / ms['float32']:.3f} |" for k, v in ms.items()],
        "",
        "Relative error against the model's ONNX Runtime export (static resnet18, 16 images, calibrated on them):",
        "",
        "| seed | integer form | float form |",
        "|---|---|---|",
        *[f"| {r['seed']} | {r['integer_vs_ort']:.4f} | {r['float_vs_ort']:.4f} |" for r in rows],
        f"| mean | {mean('integer_vs_ort'):.4f} | {mean('float_vs_ort'):.4f} |",
    ]
    atomic_write_text(args.out / f"{stem}.md", "\n".join(md) + "\n")
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
