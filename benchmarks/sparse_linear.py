"""Pruned int8 Linear layers on the CPU: the ``"sparse"`` kernel's CSR product against the dense GEMM, side by side.

For each layer shape and fraction of weights kept (the rest pruned to exactly zero), and each batch
size: the float ``nn.Linear`` called as a module (the baseline), our int8 layer as it runs
(``Int8Linear``, its kernel chosen by the rule of :mod:`lightning_compress.core.quant.sparse`), and,
as bare function calls (no module call around them, so a few microseconds cheaper than either
module), the two products it chooses between on its cached dequantized weight: the dense GEMM
(``torch.addmm`` on the ``[in, out]`` copy, the ``float`` kernel) and the CSR product
(``csr_linear``). Then the whole pruned digits MLP (64-300-100-10, 95 % of every layer's weights
zero: its 300x100 layer takes the CSR route) against its float original, int8 as it runs and int8
with the CSR copies dropped (dense GEMM at every batch). Ratios are to the float layer / the float
model (lower is faster), medians of interleaved rounds in shuffled order (``_timing.interleaved``).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/sparse_linear.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/sparse_linear.py --threads 2
    python benchmarks/sparse_linear.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a smoke test loads this script from its path
from _common import RESULTS, table_head, write_results
from _cpu import cpu_header
from _timing import interleaved

from lightning_compress.core.quant.convert import quantize
from lightning_compress.core.quant.kernels import _ATTR, prepare_kernels
from lightning_compress.core.quant.modules import Int8Linear
from lightning_compress.core.quant.sparse import csr_linear, to_csr

SHAPES = ((300, 100), (784, 256), (300, 300), (1024, 64), (512, 32), (64, 300))
KEEP = (0.1, 0.05)
BATCHES = (1, 32, 64, 128, 256)
MODEL_KEEP = 0.05


def pruned_linear(k: int, n: int, keep: float, seed: int = 0) -> nn.Linear:
    """A float Linear with all but a fraction ``keep`` of its weights (the largest) set to zero."""
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).eval()
    with torch.no_grad():
        w = lin.weight
        threshold = w.abs().flatten().kthvalue(max(1, int(w.numel() * (1 - keep)))).values
        w[w.abs() <= threshold] = 0.0
    return lin


def without_csr(model: nn.Module) -> nn.Module:
    """A copy of the int8 ``model`` whose layers keep the dense GEMM at every batch (CSR copies dropped)."""
    model = copy.deepcopy(model)
    prepare_kernels(model)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.__dict__[_ATTR].sparse = None
    return model


def bench_layers(shapes: tuple[tuple[int, int], ...], batches: tuple[int, ...], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for k, n in shapes:
        for keep in KEEP:
            lin = pruned_linear(k, n, keep)
            q = Int8Linear.from_float(lin, "dynamic")
            prepare_kernels(nn.Sequential(q))
            wt, csr, bias = q.__dict__[_ATTR].weight, to_csr(q.dequantize_weight()), q.bias
            for batch in batches:
                x = torch.randn(batch, k)
                with torch.no_grad():
                    ref = F.linear(x, lin.weight, lin.bias)
                    err = float((q(x) - ref).norm() / ref.norm())
                    fns = {
                        "float32": lambda x=x, lin=lin: lin(x),
                        "ours": lambda x=x, q=q: q(x),
                        "ours_dense": lambda x=x, wt=wt, b=bias: torch.addmm(b, x, wt),
                        "ours_csr": lambda x=x, csr=csr, b=bias: csr_linear(csr, b, x),
                    }
                    inner = max(5, int(2000 / (batch * k * n / 1e4 + 20)))
                    t = interleaved(fns, rounds, inner, 3)
                row: dict[str, Any] = {"layer": f"{k}x{n}", "kept": keep, "batch": batch, "kernel": q.kernel}
                row["float32_us"] = t["float32"] * 1e6
                row.update({f"{v}_ratio": t[v] / t["float32"] for v in ("ours", "ours_dense", "ours_csr")})
                row["ours_rel_err"] = err
                rows.append(row)
                print(row, flush=True)
    return rows


def digits_mlp(keep: float) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            model[i] = pruned_linear(m.in_features, m.out_features, keep, seed=i)
    return model


def bench_model(batches: tuple[int, ...], rounds: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    base = digits_mlp(MODEL_KEEP)
    ours = copy.deepcopy(base)
    quantize(ours, "dynamic")
    chosen = prepare_kernels(ours)
    dense = without_csr(ours)
    rows = []
    for batch in batches:
        x = torch.randn(batch, 64)
        with torch.no_grad():
            fns = {"float32": lambda x=x: base(x), "ours": lambda x=x: ours(x), "ours_dense": lambda x=x: dense(x)}
            t = interleaved(fns, rounds * 3, 20, 3)
        row: dict[str, Any] = {"batch": batch, "float32_ms": t["float32"] * 1e3}
        row.update({f"{v}_ratio": t[v] / t["float32"] for v in ("ours", "ours_dense")})
        rows.append(row)
        print(row, flush=True)
    return rows, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="one small shape, batches 1 and 64, 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes, batches, rounds = (((300, 100),), (1, 64), 2) if args.smoke else (SHAPES, BATCHES, args.rounds)
    layers = bench_layers(shapes, batches, rounds)
    model, chosen = bench_model(batches, rounds)
    command = "python benchmarks/sparse_linear.py " + ("--smoke" if args.smoke else f"--threads {args.threads}")
    header = cpu_header()
    result = {"command": command, "torch": torch.__version__, "cpu": header, "threads": args.threads}
    result.update({"layers": layers, "model": model, "model_kernels": chosen})
    md = [
        f"# Pruned int8 Linear: CSR product vs dense GEMM ({command})",
        "",
        f"{header}. torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {rounds} interleaved",
        "rounds (order shuffled per round). Ratios to the float32 `nn.Linear` module (layers) or the float model;",
        "lower is faster. `ours`: the int8 layer as it runs (`kernel`: what it chose); `ours_dense` / `ours_csr`:",
        "the dense GEMM (`addmm` on the cached `[in, out]` weight) / the CSR product (`csr_linear`) as bare calls",
        "(no module call around them). Model: `ours_dense`",
        "is the int8 model with its CSR copies dropped.",
        "",
        *table_head("layer", "kept", "batch", "kernel", "float32 us", "ours", "ours_dense", "ours_csr", "rel. err"),
    ]
    for r in layers:
        md.append(
            f"| {r['layer']} | {r['kept']:.0%} | {r['batch']} | {r['kernel']} | {r['float32_us']:.1f} | "
            f"{r['ours_ratio']:.3f} | {r['ours_dense_ratio']:.3f} | {r['ours_csr_ratio']:.3f} | "
            f"{r['ours_rel_err']:.1e} |"
        )
    md += ["", f"## Digits MLP 64-300-100-10, {1 - MODEL_KEEP:.0%} pruned, int8 dynamic (kernels: {chosen})", ""]
    md += table_head("batch", "float32 ms", "ours", "ours_dense")
    md += [
        f"| {r['batch']} | {r['float32_ms']:.3f} | {r['ours_ratio']:.3f} | {r['ours_dense_ratio']:.3f} |" for r in model
    ]
    stem = "sparse_linear_smoke" if args.smoke else f"sparse_linear_{args.threads}thread"
    write_results(args.out, stem, result, md)


if __name__ == "__main__":
    main()
