"""Artifact size of int8 models against the float32 ``state_dict`` file, side by side in one run.

For each model the float32 ``torch.save(model.state_dict())`` file is the baseline; beside it are
our ``save_compressed`` artifacts of the int8 model (dense, and 90 % magnitude-pruned before
quantization) and, as a peer, ``torch.save`` of the ``torch.ao`` ``quantize_dynamic`` model's
``state_dict`` (dense only: it has no sparse format).

    python benchmarks/int8_size.py           # writes benchmarks/results/int8_size.{md,json}
    python benchmarks/int8_size.py --smoke   # tiny models, a second
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import file_bytes, table_head, to_int8, write_results

from lightning_compress import save_compressed
from lightning_compress.core.quant.convert import quantizable_targets
from lightning_compress.demo import MLP, SmallCNN

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def prune_(model: nn.Module, sparsity: float) -> None:
    """Global magnitude pruning of the Linear/Conv2d weights (a stand-in for PruningCallback's result)."""
    weights = [t.module.weight for t in quantizable_targets(model)[0]]
    scores = torch.cat([w.abs().flatten() for w in weights])
    k = int(sparsity * scores.numel())
    threshold = scores.kthvalue(k).values
    for w in weights:
        w[w.abs() <= threshold] = 0.0


def int8(model: nn.Module) -> nn.Module:
    return to_int8(model)  # dynamic, as QuantizeOnFitEnd's default


def ao_size(model: nn.Module) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            return None
        q = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        return file_bytes(lambda p: torch.save(q.state_dict(), p))


def models(smoke: bool) -> dict[str, Callable[[], nn.Module]]:
    if smoke:
        return {"mlp-256": lambda: nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))}
    out: dict[str, Callable[[], nn.Module]] = {
        "mlp-4096x4": lambda: nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(4096, 4096), nn.ReLU())]),
        "digits-mlp": MLP,
        "digits-cnn": SmallCNN,
    }
    try:
        import torchvision

        out["resnet18"] = lambda: torchvision.models.resnet18()
        out["mobilenet_v3_small"] = lambda: torchvision.models.mobilenet_v3_small()
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, make in models(args.smoke).items():
        model = make().eval()
        base = file_bytes(lambda p, m=model: torch.save(m.state_dict(), p))
        dense_model = int8(model)
        dense = file_bytes(lambda p, m=dense_model: save_compressed(m, p))
        sparse_model = copy.deepcopy(model)
        prune_(sparse_model, args.sparsity)
        sparse_int8 = int8(sparse_model)
        sparse = file_bytes(lambda p, m=sparse_int8: save_compressed(m, p))
        sparse_float = file_bytes(lambda p, m=sparse_model: save_compressed(m, p))
        peer = ao_size(model)
        row = {
            "model": name,
            "float32_bytes": base,
            "int8_ratio": dense / base,
            f"int8_sparse{int(args.sparsity * 100)}_ratio": sparse / base,
            f"float_sparse{int(args.sparsity * 100)}_ratio": sparse_float / base,
            "ao_quantize_dynamic_ratio": None if peer is None else peer / base,
        }
        rows.append(row)
        print(
            f"{name:20s} float32 {base / 2**20:8.2f} MiB | int8 {row['int8_ratio']:.4f} | int8 +"
            f" {args.sparsity:.0%} sparse {sparse / base:.4f} | float {args.sparsity:.0%} sparse packed"
            f" {sparse_float / base:.4f} | ao quantize_dynamic " + ("n/a" if peer is None else f"{peer / base:.4f}"),
            flush=True,
        )
    command = "python benchmarks/int8_size.py" + (" --smoke" if args.smoke else "")
    result = {"command": command, "torch": torch.__version__, "sparsity": args.sparsity, "rows": rows}
    cols = [k for k in rows[0] if k.endswith("_ratio")]
    md = [
        f"# Artifact size / float32 state_dict file ({command})",
        "",
        f"torch {torch.__version__}. Goals: int8 <= 0.26; int8 + {args.sparsity:.0%} sparse <= 0.07.",
        "",
        *table_head("model", "float32 MiB", *cols),
    ]
    for r in rows:
        cells = ["n/a" if r[c] is None else f"{r[c]:.4f}" for c in cols]
        md.append(f"| {r['model']} | {r['float32_bytes'] / 2**20:.2f} | " + " | ".join(cells) + " |")
    write_results(args.out, "int8_size_smoke" if args.smoke else "int8_size", result, md)


if __name__ == "__main__":
    main()
