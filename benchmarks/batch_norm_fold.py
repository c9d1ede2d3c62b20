"""Batch norm folding before int8 (``core/quant/fold.py``): what it costs in accuracy and buys in speed.

torchvision resnet18 (random weights; batch norm statistics and affine randomized as after
training, the same for every variant), side by side in one run:

* output error of the int8 model against float32 (``||y_int8 - y|| / ||y||`` on 16 images of
  64x64), each mode and weight granularity, folded and not;
* PyTorch eager and ONNX Runtime (``export_onnx``, int8 weights) milliseconds per call of the
  static model folded and not, batch 4 at 112x112, in interleaved rounds (medians).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/batch_norm_fold.py
    python benchmarks/batch_norm_fold.py --smoke --out /tmp   # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.convert import quantize

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent))
from _cpu import cpu_header  # noqa: E402


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2.8 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.2 + 0.3)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def timed(fns: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - start) / reps * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None, help="folder for the results (default benchmarks/results)")
    args = parser.parse_args()
    size, rounds, reps = (32, 2, 1) if args.smoke else (112, args.rounds, 3)
    torch.manual_seed(5)
    images = torch.randn(16, 3, 32 if args.smoke else 64, 32 if args.smoke else 64)
    reference = resnet18()
    with torch.no_grad():
        want = reference(images)
    errors: dict[str, dict[str, float]] = {}
    for mode in ("dynamic", "static", "weight_only"):
        for per_channel in (True, False):
            row = errors.setdefault(f"{mode}, {'per channel' if per_channel else 'per tensor'}", {})
            for fold in (False, True):
                model = resnet18()
                # per tensor, `quantize` folds nothing: fold by hand to measure what it would cost
                if fold and not per_channel:
                    from lightning_compress.core.quant.fold import fold_batch_norms

                    fold_batch_norms(model, {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)})
                quantize(model, mode, per_channel, calibration=[images[:8]], fold_batch_norm=fold)
                with torch.no_grad():
                    got = model(images)
                row["folded" if fold else "not folded"] = float((got - want).norm() / want.norm())
    x = torch.randn(4, 3, size, size)
    variants: dict[str, nn.Module] = {"float32": reference}
    for fold in (False, True):
        model = copy.deepcopy(reference)
        quantize(model, "static", calibration=[images[:8]], fold_batch_norm=fold)
        variants[f"static, {'folded' if fold else 'not folded'}"] = model
    fns: dict[str, Callable[[], Any]] = {}
    for name, model in variants.items():
        fns[f"PyTorch {name}"] = lambda model=model: model(x)
    try:
        import onnxruntime as ort

        from lightning_compress import export_onnx

        folder = tempfile.mkdtemp()
        for name, model in variants.items():
            if name == "float32":
                continue
            path = os.path.join(folder, f"{len(fns)}.onnx")
            export_onnx(model, path, x[:2], weight_dtype="int8")
            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x.numpy()}
            fns[f"ONNX Runtime {name}"] = lambda s=session, f=feed: s.run(None, f)
    except ImportError:
        print("onnxruntime is not installed: PyTorch only")
    with torch.no_grad():
        ms = timed(fns, rounds, reps)
    header = f"CPU: {cpu_header()}; threads: {torch.get_num_threads()}; torch {torch.__version__}"
    lines = [
        "# Batch norm folding before int8: resnet18",
        "",
        header,
        "",
        "Relative output error to float32 (16 images, 64x64):",
        "",
        "| mode | not folded | folded |",
        "|---|---|---|",
        *[f"| {k} | {v['not folded']:.4f} | {v['folded']:.4f} |" for k, v in errors.items()],
        "",
        f"Median ms per call, batch 4 at {size}x{size}, interleaved rounds:",
        "",
        "| variant | ms |",
        "|---|---|",
        *[f"| {k} | {v:.2f} |" for k, v in ms.items()],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out) if args.out else RESULTS
    stem = "batch_norm_fold_smoke" if args.smoke else "batch_norm_fold"
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.json", json.dumps({"cpu": header, "errors": errors, "ms": ms}, indent=1))


if __name__ == "__main__":
    main()
