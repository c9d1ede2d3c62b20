"""CPU latency of int8 models against float32, side by side in one run.

Linear: a 4-layer MLP of width 4096 (ReLU between) at batch 1, 16, 64 and 256:
float32, ours (``QuantizeOnFitEnd`` dynamic and static modes, i.e. ``quantize``),
``torch.ao.quantization.quantize_dynamic`` (the deprecated peer) and torchao's
``Int8DynamicActivationInt8WeightConfig`` when torchao is importable.

Digits MLP (64-300-100-10, the main job's model shape) at the same batches: float32, ours (dynamic,
static), ``quantize_dynamic``, and ``torch.compile`` of ours (dynamic) and of float32.
Each ratio column is the variant's median over the float32 median; ``ours/peer`` divides ours by
``quantize_dynamic``. A ``_paired`` column is the median of the same ratio taken round by round (the two
timed side by side, so that load drifting during the run cancels), with its quartiles.
The kernel each int8 layer picked (``Int8Linear.kernel``) is printed.

Conv: a stack of 3x3 convolutions and torchvision's resnet18, float32 against our Int8Conv2d
(dequantized weight + F.conv2d) and against the alternative we rejected (unfold + torch._int_mm).

The variants are timed in interleaved rounds (float, ours, peer, then the next round; each round in a
shuffled order) and each figure is the median over the rounds, so that load on a shared machine hits
them alike.

    python benchmarks/int8_latency.py            # full run, writes benchmarks/results/int8_latency.{md,json}
    python benchmarks/int8_latency.py --smoke    # tiny sizes, a few seconds
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/int8_latency.py --threads 1 --no-conv
    python benchmarks/int8_latency.py --threads 2 --no-conv
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_compress.core.files import atomic_write_text
from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.kernels import prepare_kernels
from lightning_compress.core.quant.modules import Int8Conv2d
from lightning_compress.core.quant.primitives import quantize_rows

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parent))  # _cpu, _timing, also when a smoke test loads this script from its path
from _common import ao_dynamic  # noqa: E402
from _cpu import cpu_header  # noqa: E402
from _timing import interleaved, interleaved_samples, paired_ratio  # noqa: E402

WARMUP = 10
"""Calls of each variant before its timing (the first calls of a compiled model compile it)."""


def digits_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()


def mlp(width: int, depth: int = 4) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def ours(model: nn.Module, mode: str, calib: Tensor | None = None) -> nn.Module:
    model = copy.deepcopy(model)
    assert mode != "static" or calib is not None
    quantize(model, mode, calibration=[calib] if mode == "static" else ())
    prepare_kernels(model)
    return model


def torchao_dynamic(model: nn.Module) -> tuple[nn.Module | None, str]:
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except Exception as err:  # not installed, or built for another torch
        return None, f"not importable ({type(err).__name__})"
    m = copy.deepcopy(model)
    try:
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
    except Exception as err:
        return None, f"torchao {torchao.__version__}: quantize_ failed ({type(err).__name__}: {err})"
    return m, f"torchao {torchao.__version__}"


def bench_linear(
    base: nn.Module, width: int, batches: list[int], rounds: int, compiled: bool
) -> tuple[list[dict[str, object]], str, dict[str, str]]:
    torch.manual_seed(0)
    calib = torch.relu(torch.randn(64, width))
    variants: dict[str, nn.Module] = {"float32": base, "ours_dynamic": ours(base, "dynamic")}
    variants["ours_static"] = ours(base, "static", calib)
    chosen = prepare_kernels(variants["ours_dynamic"])
    ao = ao_dynamic(base)
    if ao is not None:
        variants["ao_quantize_dynamic"] = ao
    tao_note = "not measured"
    if width >= 1024:
        tao, tao_note = torchao_dynamic(base)
        if tao is not None:
            variants["torchao_int8_dynamic"] = tao
    calls: dict[str, Callable[[Tensor], Tensor]] = dict(variants)
    if compiled:
        torch._dynamo.reset()
        calls["compiled_ours_dynamic"] = torch.compile(variants["ours_dynamic"])
        calls["compiled_float32"] = torch.compile(copy.deepcopy(base))
    rows = []
    for batch in batches:
        x = torch.randn(batch, width)
        with torch.no_grad():
            ref = base(x)
            errors = {k: float((m(x) - ref).norm() / ref.norm()) for k, m in calls.items()}
            inner = max(1, int(64 / max(batch, 1) ** 0.5)) if width >= 1024 else 50
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in calls.items()}
            # Small models: many short rounds, so that the median sees through a shared machine's load.
            samples = interleaved_samples(fns, rounds if width >= 1024 else max(rounds, 5) * 6, inner, WARMUP)
            times = {k: statistics.median(v) for k, v in samples.items()}
        row: dict[str, object] = {"batch": batch, "float32_ms": times["float32"] * 1e3}
        for k in calls:
            if k != "float32":
                row[f"{k}_ratio"] = times[k] / times["float32"]
                row[f"{k}_rel_err"] = errors[k]
        for k in ("ours_dynamic", "ours_static"):  # against float32, round by round, with the quartiles
            paired_float = paired_ratio(samples[k], samples["float32"])
            row[f"{k}_ratio_paired"], row[f"{k}_ratio_q1"], row[f"{k}_ratio_q3"] = paired_float
        if "ao_quantize_dynamic" in times:
            for k in ("ours_dynamic", "ours_static"):
                row[f"{k}_over_peer"] = times[k] / times["ao_quantize_dynamic"]
                # Round by round (each pair timed side by side), with the quartiles of that ratio.
                paired = paired_ratio(samples[k], samples["ao_quantize_dynamic"])
                row[f"{k}_over_peer_paired"], row[f"{k}_over_peer_q1"], row[f"{k}_over_peer_q3"] = paired
        rows.append(row)
        print(
            f"  batch {batch:4d}: float32 {times['float32'] * 1e3:8.3f} ms | "
            + " | ".join(f"{k} {times[k] / times['float32']:.3f}x" for k in calls if k != "float32"),
            flush=True,
        )
    return rows, tao_note, chosen


def unfold_int8_conv(x: Tensor, conv: Int8Conv2d) -> Tensor:
    """The rejected alternative: im2col + per-row int8 activations + torch._int_mm (groups == 1 only)."""
    n, _, h, w = x.shape
    kh, kw = conv.kernel_size
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # type: ignore[arg-type]
    ho = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1  # type: ignore[index]
    wo = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1  # type: ignore[index]
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    q, s = quantize_rows(rows)
    acc = torch._int_mm(q, conv.int8_weight.reshape(conv.out_channels, -1).t())
    out = acc.float().mul_(s).mul_(conv.weight_scale)
    if conv.bias is not None:
        out.add_(conv.bias)
    return out.reshape(n, ho * wo, -1).transpose(1, 2).reshape(n, -1, ho, wo)


def bench_conv(smoke: bool, rounds: int) -> list[dict[str, object]]:
    torch.manual_seed(0)
    rows: list[dict[str, object]] = []
    shapes = [(8, 16, 16, 16)] if smoke else [(1, 64, 56, 56), (8, 64, 56, 56), (8, 128, 28, 28), (8, 256, 14, 14)]
    for n, c, h, w in shapes:
        conv = nn.Conv2d(c, c, 3, padding=1).eval()
        q = Int8Conv2d.from_float(conv)
        x = torch.randn(n, c, h, w)
        with torch.no_grad():
            ref = conv(x)
            err_deq = float((q(x) - ref).norm() / ref.norm())
            err_unf = float((unfold_int8_conv(x, q) - ref).norm() / ref.norm())
            times = interleaved(
                {
                    "float32": lambda conv=conv, x=x: conv(x),
                    "dequant": lambda q=q, x=x: q(x),
                    "unfold": lambda q=q, x=x: unfold_int8_conv(x, q),
                },
                rounds,
                3,
                WARMUP,
            )
        rows.append(
            {
                "layer": f"Conv2d({c},{c},3) on {n}x{c}x{h}x{w}",
                "float32_ms": times["float32"] * 1e3,
                "ours_dequant_ratio": times["dequant"] / times["float32"],
                "unfold_int_mm_ratio": times["unfold"] / times["float32"],
                "ours_dequant_rel_err": err_deq,
                "unfold_int_mm_rel_err": err_unf,
            }
        )
        print(
            f"  {rows[-1]['layer']}: float32 {times['float32'] * 1e3:.2f} ms | dequant"
            f" {rows[-1]['ours_dequant_ratio']:.3f}x | unfold+_int_mm {rows[-1]['unfold_int_mm_ratio']:.3f}x",
            flush=True,
        )
    try:
        import torchvision
    except ImportError:
        return rows
    size, batch = (32, 2) if smoke else (224, 8)
    net = torchvision.models.resnet18(num_classes=10).eval()
    qnet = ours(net, "dynamic")
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        ref = net(x)
        err = float((qnet(x) - ref).norm() / ref.norm())
        times = interleaved({"float32": lambda: net(x), "ours": lambda: qnet(x)}, rounds, 1, WARMUP)
    rows.append(
        {
            "layer": f"resnet18 on {batch}x3x{size}x{size}",
            "float32_ms": times["float32"] * 1e3,
            "ours_dequant_ratio": times["ours"] / times["float32"],
            "unfold_int_mm_ratio": None,
            "ours_dequant_rel_err": err,
            "unfold_int_mm_rel_err": None,
        }
    )
    print(
        f"  {rows[-1]['layer']}: float32 {times['float32'] * 1e3:.2f} ms | ours {rows[-1]['ours_dequant_ratio']:.3f}x"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-conv", action="store_true", help="skip the convolution section")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width = 128 if args.smoke else 4096
    batches = [1, 4] if args.smoke else [1, 16, 64, 256]
    rounds = args.rounds or (3 if args.smoke else 15)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    cpu = cpu_header()
    print(f"int8 CPU latency, torch {torch.__version__}, {threads} threads, {cpu}")
    print(f"Linear: 4-layer MLP of width {width}; ratio = variant median / float32 median over {rounds} rounds")
    linear_rows, tao_note, chosen = bench_linear(mlp(width), width, batches, rounds, compiled=False)
    print(f"  kernels: {chosen}")
    print("Digits MLP 64-300-100-10:")
    digits_rows, _, digits_chosen = bench_linear(
        digits_mlp(), 64, batches, rounds, compiled=not (args.no_compile or args.smoke)
    )
    print(f"  kernels: {digits_chosen}")
    conv_rows = []
    if not args.no_conv:
        print("Conv:")
        conv_rows = bench_conv(args.smoke, rounds)
    load = (load_before, os.getloadavg()[0])
    result = {
        "command": "python benchmarks/int8_latency.py"
        + (" --smoke" if args.smoke else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --rounds {args.rounds}" if args.rounds else "")
        + (" --no-conv" if args.no_conv else "")
        + (" --no-compile" if args.no_compile else ""),
        "load_average_1min_before_after": load,
        "torch": torch.__version__,
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "width": width,
        "rounds": rounds,
        "torchao": tao_note,
        "linear": linear_rows,
        "linear_kernels": chosen,
        "digits": digits_rows,
        "digits_kernels": digits_chosen,
        "conv": conv_rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "int8_latency_smoke" if args.smoke else "int8_latency"
    if args.threads:
        stem += f"_{args.threads}thread"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2))
    md = [
        f"# int8 CPU latency ({result['command']})",
        "",
        f"{cpu}. torch {torch.__version__}, {threads} threads, CPU capability {result['cpu_capability']};"
        f" medians of {rounds} interleaved rounds (order shuffled per round); torchao: {tao_note};"
        " 1-minute load average"
        f" {load[0]:.1f} before, {load[1]:.1f} after on {os.cpu_count()} cores"
        + (" (other processes shared the cores)." if max(load) > 0.5 * (os.cpu_count() or 1) + threads else "."),
    ]
    for title, rows, kinds in (
        (f"4-layer MLP, width {width}", linear_rows, chosen),
        ("Digits MLP 64-300-100-10", digits_rows, digits_chosen),
    ):
        cols = [k for k in rows[0] if k.endswith(("_ratio", "_over_peer"))]
        md += ["", f"## {title} (latency ratio to float32; `_over_peer`: ours / quantize_dynamic; lower is faster)", ""]
        md += [f"Kernels: {kinds}", ""]
        paired = [k for k in rows[0] if k.endswith("_paired")]
        heads = cols + [f"{k} [quartiles]" for k in paired]
        md += ["| batch | float32 ms | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
        for r in rows:
            cells = [f"{r[c]:.3f}" for c in cols]
            for k in paired:
                key = k[: -len("paired")]
                cells.append(f"{r[k]:.3f} [{r[key + 'q1']:.3f}, {r[key + 'q3']:.3f}]")
            md.append(f"| {r['batch']} | {r['float32_ms']:.3f} | " + " | ".join(cells) + " |")
    if not conv_rows:
        atomic_write_text(args.out / f"{stem}.md", "\n".join(md) + "\n")
        print(f"wrote {args.out / stem}.md and .json")
        return
    md += ["", "## Convolutions (ours: dequantized weight + F.conv2d; rejected: unfold + _int_mm)", ""]
    md += ["| layer | float32 ms | ours dequant | unfold + _int_mm |", "|---|---|---|---|"]
    for r in conv_rows:
        unf = "n/a" if r["unfold_int_mm_ratio"] is None else f"{r['unfold_int_mm_ratio']:.3f}"
        md.append(f"| {r['layer']} | {r['float32_ms']:.2f} | {r['ours_dequant_ratio']:.3f} | {unf} |")
    atomic_write_text(args.out / f"{stem}.md", "\n".join(md) + "\n")
    print(f"wrote {args.out / stem}.md and .json")


if __name__ == "__main__":
    main()
