"""One prepared GPU check of the int8 layers: correctness against float, and int8/bf16 latency.

Run it where a CUDA device is at hand (it takes about a minute on an H100/H200)::

    python benchmarks/gpu_int8_check.py            # writes benchmarks/results/gpu_int8_check.{md,json}
    python benchmarks/gpu_int8_check.py --smoke    # tiny sizes; on the CPU when there is no GPU

Correctness: ``Int8Linear`` in every mode on shapes that do and do not meet ``torch._int_mm``'s
CUDA constraints (more than 16 rows, ``K`` and ``N`` multiples of 8), float32 and bfloat16 inputs,
against the float layer and against the same int8 layer on the CPU; whole converted models (digits
MLP and CNN, resnet18, a transformer encoder) moved to the GPU, in float32 and in bfloat16.

Latency (CUDA events, medians): a 4-layer 4096-wide MLP, ours (dynamic int8, weight-only int8)
against the same MLP in bfloat16, at batch 1, 16, 64, 256, 1024; and the bare kernels
``torch._int_mm`` with a column-major and a row-major weight against a bf16 ``mm``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import to_int8 as _to_int8

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.modules import Int8Linear, int8_mm
from lightning_compress.core.quant.primitives import quantize_rows
from lightning_compress.demo import MLP, SmallCNN

RESULTS = Path(__file__).resolve().parent / "results"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def to_int8(model: nn.Module, mode: str, calibration: torch.Tensor) -> nn.Module:
    """Convert a copy as QuantizeOnFitEnd does; static scales are observed on ``calibration``."""
    return _to_int8(model, mode, calibration=[calibration] if mode == "static" else [])


def check_layers(device: torch.device, smoke: bool) -> list[dict[str, object]]:
    rows = []
    sizes = [(1, 64, 32), (17, 64, 32), (20, 60, 30)] if smoke else [
        (1, 4096, 4096), (16, 4096, 4096), (17, 4096, 4096), (64, 4096, 11008), (333, 4100, 4096), (64, 4096, 4090)
    ]  # fmt: skip
    for m, k, n in sizes:
        torch.manual_seed(0)
        layer = nn.Linear(k, n).to(device)
        x = torch.randn(m, k, device=device)
        for mode in ("dynamic", "static", "weight_only"):
            scale = x.abs().amax().cpu() / 127
            q = Int8Linear.from_float(layer, mode, input_scale=scale)
            q_cpu = copy.deepcopy(q).cpu()
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                with torch.no_grad():
                    out = q(xd)
                    ref = layer.to(dtype)(xd)
                    cpu = q_cpu(xd.float().cpu())
                layer.float()
                xq, _ = quantize_rows(x)
                uses_int_mm = mode != "weight_only" and int8_mm(xq, q.int8_weight) is not None
                rows.append(
                    {
                        "shape": f"{m}x{k}x{n}",
                        "mode": mode,
                        "dtype": str(dtype).removeprefix("torch."),
                        "out_dtype_ok": out.dtype == dtype and out.device == x.device,
                        "int_mm": uses_int_mm,
                        "rel_err_vs_float": rel(out, ref),
                        "rel_err_vs_cpu_int8": rel(out, cpu),
                    }
                )
    return rows


def check_models(device: torch.device, smoke: bool) -> list[dict[str, object]]:
    models: dict[str, tuple[nn.Module, torch.Tensor]] = {
        "digits-mlp": (MLP(), torch.rand(64, 1, 8, 8)),
        "digits-cnn": (SmallCNN(), torch.rand(64, 1, 8, 8)),
        "transformer": (
            nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True), 2),
            torch.randn(8, 16, 64),
        ),
    }
    if not smoke:
        try:
            import torchvision

            models["resnet18"] = (torchvision.models.resnet18(num_classes=10), torch.randn(8, 3, 64, 64))
            models["mobilenet_v3_small"] = (torchvision.models.mobilenet_v3_small(), torch.randn(8, 3, 64, 64))
        except ImportError:
            pass
    rows = []
    for name, (model, x) in models.items():
        model.eval()
        for mode in ("dynamic", "static", "weight_only"):
            q = to_int8(model, mode, x).eval()
            with torch.no_grad():
                float_cpu = model(x)
                int8_cpu = q(x)
                q_gpu = copy.deepcopy(q).to(device)
                int8_gpu = q_gpu(x.to(device))
                q_bf16 = copy.deepcopy(q).to(device, torch.bfloat16)
                int8_bf16 = q_bf16(x.to(device, torch.bfloat16))
            scales_fp32 = all(
                m.weight_scale.dtype == torch.float32 for m in q_bf16.modules() if hasattr(m, "weight_scale")
            )
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "gpu_vs_cpu_int8": rel(int8_gpu, int8_cpu),
                    "gpu_vs_float": rel(int8_gpu, float_cpu),
                    "bf16_gpu_vs_float": rel(int8_bf16, float_cpu),
                    "bf16_scales_stay_float32": scales_fp32,
                }
            )
    return rows


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    def run(fn: Callable[[], object], reps: int) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return run


def latency(device: torch.device, smoke: bool) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    width = 256 if smoke else 4096
    batches = [1, 32] if smoke else [1, 16, 64, 256, 1024]
    reps = 5 if smoke else 50
    run = timer(device)
    torch.manual_seed(0)
    base = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())][:-1]).eval()
    bf16 = copy.deepcopy(base).to(device, torch.bfloat16)
    calibration = torch.randn(64, width)
    dyn = to_int8(base, "dynamic", calibration).to(device, torch.bfloat16)
    wo = to_int8(base, "weight_only", calibration).to(device, torch.bfloat16)
    mlp_rows = []
    for b in batches:
        x = torch.randn(b, width, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            t_bf16 = run(lambda x=x: bf16(x), reps)
            t_dyn = run(lambda x=x: dyn(x), reps)
            t_wo = run(lambda x=x: wo(x), reps)
        mlp_rows.append(
            {
                "batch": b,
                "bf16_ms": t_bf16 * 1e3,
                "int8_dynamic_ratio": t_dyn / t_bf16,
                "int8_weight_only_ratio": t_wo / t_bf16,
            }
        )
        print(
            f"  MLP batch {b:5d}: bf16 {t_bf16 * 1e3:.3f} ms | dynamic {t_dyn / t_bf16:.3f}x"
            f" | weight-only {t_wo / t_bf16:.3f}x"
        )
    kernel_rows = []
    for m in [32, 256, 1024] if not smoke else [32]:
        a = torch.randint(-127, 128, (m, width), dtype=torch.int8, device=device)
        w = torch.randint(-127, 128, (width, width), dtype=torch.int8, device=device)
        w_row = w.t().contiguous()
        af, wf = a.to(torch.bfloat16), w.to(torch.bfloat16)
        t_bf16 = run(lambda af=af, wf=wf: af @ wf.t(), reps)
        t_col = run(lambda a=a, w=w: torch._int_mm(a, w.t()), reps)
        t_row = run(lambda a=a, w_row=w_row: torch._int_mm(a, w_row), reps)
        kernel_rows.append(
            {
                "M": m,
                "bf16_ms": t_bf16 * 1e3,
                "int_mm_colmajor_ratio": t_col / t_bf16,
                "int_mm_rowmajor_ratio": t_row / t_bf16,
            }
        )
        print(
            f"  kernel M={m}: bf16 {t_bf16 * 1e3:.3f} ms | _int_mm column-major {t_col / t_bf16:.3f}x"
            f" | row-major {t_row / t_bf16:.3f}x"
        )
    return mlp_rows, kernel_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on the CPU when there is no GPU")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
    elif args.smoke:
        device, name = torch.device("cpu"), "cpu (no CUDA device; smoke run)"
    else:
        raise SystemExit("gpu_int8_check.py needs a CUDA device (use --smoke to exercise it on the CPU).")
    print(f"int8 GPU check on {name}, torch {torch.__version__}")
    layer_rows = check_layers(device, args.smoke)
    model_rows = check_models(device, args.smoke)
    failures = [r for r in layer_rows if not r["out_dtype_ok"] or r["rel_err_vs_float"] > 0.03]  # type: ignore[operator]
    failures += [r for r in layer_rows if r["dtype"] == "float32" and r["rel_err_vs_cpu_int8"] > 1e-4]  # type: ignore[operator]
    failures += [
        r
        for r in model_rows
        if r["gpu_vs_cpu_int8"] > 1e-3
        or r["gpu_vs_float"] > 0.05
        or r["bf16_gpu_vs_float"] > 0.1
        or not r["bf16_scales_stay_float32"]  # type: ignore[operator]
    ]
    print(f"correctness: {len(layer_rows)} layer checks, {len(model_rows)} model checks, {len(failures)} failures")
    for r in failures:
        print("  FAIL", r)
    mlp_rows, kernel_rows = latency(device, args.smoke)
    command = "python benchmarks/gpu_int8_check.py" + (" --smoke" if args.smoke else "")
    result = {
        "command": command,
        "device": name,
        "torch": torch.__version__,
        "layers": layer_rows,
        "models": model_rows,
        "failures": len(failures),
        "mlp_latency": mlp_rows,
        "kernel_latency": kernel_rows,
    }
    md = [f"# int8 on {name} ({command})", "", f"torch {torch.__version__}; {len(failures)} correctness failures.", ""]
    md += ["| shape | mode | dtype | _int_mm | rel err vs float | rel err vs CPU int8 |", "|---|---|---|---|---|---|"]
    md += [
        f"| {r['shape']} | {r['mode']} | {r['dtype']} | {r['int_mm']} | {r['rel_err_vs_float']:.2e}"
        f" | {r['rel_err_vs_cpu_int8']:.2e} |"
        for r in layer_rows
    ]
    md += ["", "| model | mode | GPU vs CPU int8 | GPU vs float | bf16 GPU vs float |", "|---|---|---|---|---|"]
    md += [
        f"| {r['model']} | {r['mode']} | {r['gpu_vs_cpu_int8']:.2e} | {r['gpu_vs_float']:.2e}"
        f" | {r['bf16_gpu_vs_float']:.2e} |"
        for r in model_rows
    ]
    md += ["", "| batch | bf16 ms | int8 dynamic / bf16 | int8 weight-only / bf16 |", "|---|---|---|---|"]
    md += [
        f"| {r['batch']} | {r['bf16_ms']:.3f} | {r['int8_dynamic_ratio']:.3f} | {r['int8_weight_only_ratio']:.3f} |"
        for r in mlp_rows
    ]
    md += ["", "| M | bf16 ms | _int_mm column-major / bf16 | _int_mm row-major / bf16 |", "|---|---|---|---|"]
    md += [
        f"| {r['M']} | {r['bf16_ms']:.3f} | {r['int_mm_colmajor_ratio']:.3f} | {r['int_mm_rowmajor_ratio']:.3f} |"
        for r in kernel_rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_int8_check_smoke" if args.smoke else "gpu_int8_check"
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", "\n".join(md) + "\n")):
        atomic_write_text(args.out / f"{stem}{suffix}", text)
    print(f"wrote {args.out / stem}.md and .json")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
