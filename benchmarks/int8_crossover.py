"""Where int8 starts to pay for a small Linear on the CPU: the ``float`` kernel against fbgemm, by batch size.

Layers below :data:`~lightning_compress.core.quant.kernels.MIN_INT8_WEIGHTS` weights (the digits MLP's
64x300, 300x100 and 100x10, and 128x128, 256x256) compute with the ``"float"`` kernel (the dequantized
weight, one ``addmm``) at every batch size. This script times, on the same layer, that kernel against
our two fbgemm paths as they would run if the layer were routed there (``dynamic``: per-row scales,
``static``: the calibrated scale, both bare calls of the kernel functions, no module call) and
against ``torch.ao.quantization.quantize_dynamic``'s layer (one scale per call, ``reduce_range``), at
16 to 512 rows. Ratios are to the ``float`` kernel (lower is faster), medians of interleaved rounds
in shuffled order (``_timing.interleaved``).

It is the measurement behind a decision *not* taken: a batch-size switch (float below some rows,
fbgemm above) would make a row's result depend on how many rows it came with (the ``float`` kernel
leaves activations unquantized, fbgemm rounds them to int8), so the kernel stays a function of the
layer alone (see ``docs/benchmarks.rst``).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/int8_crossover.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/int8_crossover.py --threads 2
    python benchmarks/int8_crossover.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a smoke test loads this script from its path
from _common import RESULTS, ao_dynamic, table_head, write_results
from _cpu import cpu_header
from _timing import interleaved

from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.kernels import (
    _fbgemm_forward,
    _float_forward,
    _Plan,
    _sources,
    fbgemm_available,
    use_kernel,
)

SHAPES = ((64, 300), (300, 100), (100, 10), (128, 128), (256, 256))
BATCHES = (16, 32, 64, 128, 256, 512)
INNER = 20


def plans(lin: nn.Linear, mode: str) -> tuple[_Plan, _Plan]:
    """The layer's ``float`` plan (its usual kernel) and the fbgemm plan it would get if forced there."""
    model = nn.Sequential(copy.deepcopy(lin))
    calib = [torch.relu(torch.randn(64, lin.in_features))] if mode == "static" else []
    quantize(model, mode, calibration=calib)
    layer = model[0]
    usual = _Plan(mode, _sources(layer))
    with use_kernel("fbgemm_u8s8"):
        forced = _Plan(mode, _sources(layer))
    assert usual.kernel == "float" and forced.kernel == "fbgemm_u8s8", (usual.kernel, forced.kernel)
    return usual, forced


def calls(float_plan: _Plan, dyn: _Plan, static: _Plan, ao: nn.Module, x: torch.Tensor, n: int) -> dict[str, Any]:
    """The four products of one ``[*, k] -> [*, n]`` layer on ``x``, as zero-argument calls."""
    k = x.shape[1]
    return {
        "float": lambda: _float_forward(float_plan, x),
        "fbgemm_dynamic": lambda: _fbgemm_forward(dyn, x, k, n),
        "fbgemm_static": lambda: _fbgemm_forward(static, x, k, n),
        "peer": lambda: ao(x),
    }


def bench(shapes: tuple[tuple[int, int], ...], batches: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(k, n).eval()
        float_plan, dyn = plans(lin, "dynamic")
        _, static = plans(lin, "static")
        peer = ao_dynamic(nn.Sequential(lin))  # quantize_dynamic swaps children, not the model itself
        assert peer is not None  # main() checked torch.ao.quantization
        ao = peer[0]
        for batch in batches:
            x = torch.relu(torch.randn(batch, k))
            fns = calls(float_plan, dyn, static, ao, x, n)
            with torch.no_grad():
                ref = lin(x)
                err = float((_fbgemm_forward(dyn, x, k, n) - ref).norm() / ref.norm())
                times = interleaved(fns, rounds, INNER)
            row: dict[str, Any] = {"layer": f"{k}x{n}", "batch": batch, "float_us": times["float"] * 1e6}
            row.update({f"{name}_ratio": times[name] / times["float"] for name in fns if name != "float"})
            row["fbgemm_dynamic_rel_err"] = err
            rows.append(row)
            print(
                f"  {k}x{n} batch {batch:4d}: float {times['float'] * 1e6:7.1f} us | "
                + " | ".join(f"{name} {row[name + '_ratio']:.2f}x" for name in fns if name != "float"),
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="one shape, batches 16 and 256, 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not fbgemm_available() or ao_dynamic(nn.Linear(1, 1)) is None:
        sys.exit("fbgemm or torch.ao.quantization is not available in this torch on this CPU: nothing to compare")
    torch.set_num_threads(args.threads)
    shapes, batches, rounds = (((300, 100),), (16, 256), 2) if args.smoke else (SHAPES, BATCHES, args.rounds)
    header = cpu_header()
    print(f"int8 crossover, torch {torch.__version__}, {args.threads} threads, {header}", flush=True)
    rows = bench(shapes, batches, rounds)
    command = "python benchmarks/int8_crossover.py " + ("--smoke" if args.smoke else f"--threads {args.threads}")
    result = {"command": command, "torch": torch.__version__, "cpu": header, "threads": args.threads, "rows": rows}
    md = [
        f"# Small int8 Linear layers: float kernel vs fbgemm by batch size ({command})",
        "",
        f"{header}. torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {rounds} interleaved",
        f"rounds of {INNER} calls (order shuffled per round). Ratios to the `float` kernel (the one these layers",
        "use); lower is faster. `fbgemm_dynamic` / `fbgemm_static`: our fbgemm paths as bare calls;",
        "`peer`: `quantize_dynamic`'s layer (one activation scale per call).",
        "",
        *table_head("layer", "batch", "float us", "fbgemm_dynamic", "fbgemm_static", "peer", "dynamic rel. err"),
    ]
    md += [
        f"| {r['layer']} | {r['batch']} | {r['float_us']:.1f} | {r['fbgemm_dynamic_ratio']:.2f} | "
        f"{r['fbgemm_static_ratio']:.2f} | {r['peer_ratio']:.2f} | {r['fbgemm_dynamic_rel_err']:.1e} |"
        for r in rows
    ]
    stem = "int8_crossover_smoke" if args.smoke else f"int8_crossover_{args.threads}thread"
    write_results(args.out, stem, result, md)


if __name__ == "__main__":
    main()
