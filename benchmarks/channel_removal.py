"""Channels removed: float32 CPU latency, parameters and accuracy of the slim model against the dense one.

ResNet-18 (torchvision, random weights, BatchNorm statistics and affine randomized as after training):
every removable coupled group found by ``find_groups`` loses 25 % / 50 % of its units, the lowest
scores first (``group_channel_masks(scope="layer")``: as Torch-Pruning's ``ratio``, the stem's group
included; a group keeps at least one unit). The masked model (weights, bias and BatchNorm entries of
the pruned units zeroed) is the reference: the slim model's outputs must equal it (relative error
printed, goal <= 1e-5). "hand-cut" is a freshly built ResNet-18 shrunk to the same shapes by
``apply_slim_shapes`` and loaded with the slim weights: what a user writing the narrow network by
hand would run. Goal at 50 %: slim latency <= 0.45x dense.

Digits MLP (``lightning_compress.demo``, 64-300-100-10): ``Classifier(MLP())`` on
``DigitsDataModule`` for ``--epochs`` epochs, dense against ``PruningCallback(f, method="channel",
scope="layer", remove_channels=True)`` at 50 % / 75 % of the hidden units (cubic schedule over the
first half, fine-tuning at full sparsity in the same fit; removal at fit end). Test accuracy of the
final model per seed; goal: mean within 0.5 points of dense at 50 %. The slim MLP of the first seed
goes through ``save_compressed`` / ``load_compressed`` into a freshly built full MLP before timing.

Latency is timed in a child process per thread setting: ``OMP_NUM_THREADS=1 taskset -c 1`` and
``OMP_NUM_THREADS=2`` (no pinning), the variants in interleaved rounds (dense, slim 25 %, slim 50 %,
hand-cut, dense, ...); each figure is the median over the rounds (the machine may be shared).

    python benchmarks/channel_removal.py            # writes benchmarks/results/channel_removal.{md,json}
    python benchmarks/channel_removal.py --smoke    # tiny sizes, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _common, _cpu, _timing, also when a smoke test loads this script from its path

import torch  # noqa: E402
from _common import RESULT, bench_trainer, run_child  # noqa: E402
from _cpu import cpu_header  # noqa: E402
from _timing import interleaved  # noqa: E402
from torch import Tensor, nn  # noqa: E402

RESULTS = HERE / "results"
LATENCY_GOAL = {0.5: 0.45}  # fraction of channels -> slim/dense latency goal (ResNet-18)
ACC_GOAL = {0.5: 0.5}  # fraction of hidden units -> allowed accuracy drop in points (digits MLP)
EXACT_GOAL = 1e-5


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------- ResNet-18


def resnet18() -> nn.Module:
    """ResNet-18 in eval mode, random weights (seed 0), BatchNorm statistics and affine randomized as after training."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def pruned_resnet18(fraction: float, example: Tensor) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """``(masked, slim, info)``: ResNet-18 with ``fraction`` of every coupled group's units zeroed, and removed."""
    from lightning_compress import remove_channels
    from lightning_compress.core.prune.group_masks import extra_masks, extra_targets, group_channel_masks
    from lightning_compress.core.prune.groups import find_groups

    model = resnet18()
    found = find_groups(model, example)
    named = dict(model.named_parameters())
    weights = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    masks, pruned = group_channel_masks(weights, found.groups, fraction, scope="layer")
    masks.update(extra_masks(extra_targets(found.groups, named), pruned))
    with torch.no_grad():
        for name, mask in masks.items():
            named[name].mul_(mask)
    slim = copy.deepcopy(model)
    with torch.no_grad():
        shapes = remove_channels(slim, example, groups=found.groups)
    removable = sum(len(g.units) for g in found.groups if g.removable and g.kind == "channel")
    info = {"units_pruned": len(pruned), "units_removable": removable, "layers_changed": len(shapes)}
    return model, slim, info


def hand_cut(slim: nn.Module) -> nn.Module:
    """A freshly built ResNet-18 shrunk to the slim shapes and loaded with the slim weights."""
    import torchvision

    from lightning_compress.core.prune.slim_io import apply_slim_shapes, slim_shapes

    fresh = torchvision.models.resnet18().eval()
    apply_slim_shapes(fresh, slim_shapes(slim))
    fresh.load_state_dict(slim.state_dict())
    return fresh


def bench_resnet(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    example = torch.randn(1, 3, min(args.image_size, 64), min(args.image_size, 64))
    dense = resnet18()
    models: dict[str, nn.Module] = {"dense": dense}
    rows: dict[str, dict[str, Any]] = {}
    for f in args.fractions:
        masked, slim, info = pruned_resnet18(f, example)
        with torch.no_grad():
            err = rel_err(slim(x), masked(x))
        models[f"slim_{f:g}"] = slim
        rows[f"slim_{f:g}"] = {"fraction": f, "rel_err_vs_masked": err, "params": params(slim), **info}
        if f == max(args.fractions):
            cut = hand_cut(slim)
            with torch.no_grad():
                rows["hand_cut"] = {
                    "fraction": f,
                    "rel_err_vs_masked": rel_err(cut(x), masked(x)),
                    "params": params(cut),
                }
            models["hand_cut"] = cut
        del masked
    with torch.no_grad():
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved(fns, args.rounds, 1)
    out: dict[str, Any] = {"dense_ms": times["dense"] * 1e3, "dense_params": params(dense), "variants": {}}
    for k, row in rows.items():
        row["ms"] = times[k] * 1e3
        row["latency_ratio"] = times[k] / times["dense"]
        row["param_ratio"] = row["params"] / params(dense)
        out["variants"][k] = row
    return out


# ----------------------------------------------------------------------------------------- digits MLP


def fit_digits(fraction: float, seed: int, args: argparse.Namespace, save: Path | None) -> dict[str, Any]:
    from lightning_compress import PruningCallback, save_compressed
    from lightning_compress.demo import MLP, Classifier, DigitsDataModule

    torch.manual_seed(seed)
    model = Classifier(MLP())
    callbacks: list[Any] = []
    if fraction:
        callbacks.append(PruningCallback(fraction, method="channel", scope="layer", remove_channels=True, verbose=0))
    trainer = bench_trainer(
        max_epochs=args.epochs, callbacks=callbacks, limit_train_batches=args.limit_batches, default_root_dir=args.tmp
    )
    data = DigitsDataModule(batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
        (metrics,) = trainer.test(model, data, verbose=False)
    hidden = [m.out_features for m in model.backbone.modules() if isinstance(m, nn.Linear)][:-1]
    if save is not None:
        save_compressed(model.backbone, save)
    return {
        "fraction": fraction,
        "seed": seed,
        "test_acc": float(metrics["test/acc"]),
        "hidden": hidden,
        "params": params(model.backbone),
    }


def bench_mlp_latency(artifacts: dict[str, str], batch: int, rounds: int) -> dict[str, Any]:
    from lightning_compress import load_compressed
    from lightning_compress.demo import MLP

    torch.manual_seed(0)
    models: dict[str, nn.Module] = {"dense": MLP().eval()}
    for key, path in artifacts.items():
        models[key] = load_compressed(path, MLP()).eval()
    x = torch.randn(batch, 64)
    with torch.no_grad():
        fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
        times = interleaved(fns, rounds, 200)
    out: dict[str, Any] = {"dense_us": times["dense"] * 1e6, "variants": {}}
    for k in artifacts:
        out["variants"][k] = {
            "us": times[k] * 1e6,
            "latency_ratio": times[k] / times["dense"],
            "params": params(models[k]),
            "param_ratio": params(models[k]) / params(models["dense"]),
        }
    return out


# ----------------------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.child)
    result = {
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "resnet18": bench_resnet(args),
        "mlp": bench_mlp_latency(json.loads(args.artifacts), args.mlp_batch, args.rounds * 3),
    }
    print(RESULT + json.dumps(result), flush=True)


def latency_child(threads: int, args: argparse.Namespace, artifacts: dict[str, str]) -> tuple[dict[str, Any], str]:
    flags = ["--child", str(threads), "--artifacts", json.dumps(artifacts), "--rounds", str(args.rounds)]
    flags += ["--batch", str(args.batch), "--image-size", str(args.image_size), "--mlp-batch", str(args.mlp_batch)]
    return run_child(Path(__file__), [*flags, "--fractions", *map(str, args.fractions)], threads)


def table(result: dict[str, Any]) -> str:
    lines = [
        "| threads | model | variant | pruned | params (ratio) | latency (ratio) | rel. err vs masked |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in result["latency"]:
        r = run["resnet18"]
        for k, v in r["variants"].items():
            lines.append(
                f"| {run['threads']} | resnet18 | {k} | {v['fraction']:.0%} of channels | {v['params']:,} "
                f"({v['param_ratio']:.3f}x) | {v['ms']:.1f} ms ({v['latency_ratio']:.3f}x) | "
                f"{v['rel_err_vs_masked']:.1e} |"
            )
        lines.append(
            f"| {run['threads']} | resnet18 | dense | - | {r['dense_params']:,} (1x) | "
            f"{r['dense_ms']:.1f} ms (1x) | - |"
        )
        m = run["mlp"]
        for k, v in m["variants"].items():
            lines.append(
                f"| {run['threads']} | digits MLP | {k} | {k.split('_')[1]} of hidden units | {v['params']:,} "
                f"({v['param_ratio']:.3f}x) | {v['us']:.1f} us ({v['latency_ratio']:.3f}x) | - |"
            )
        lines.append(f"| {run['threads']} | digits MLP | dense | - | - | {m['dense_us']:.1f} us (1x) | - |")
    return "\n".join(lines)


def acc_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| hidden units pruned | hidden widths | test acc (mean) | per seed | drop (points) | goal |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        goal = (
            "-" if s["goal_points"] is None else f"<= {s['goal_points']} pt: {'met' if s['meets_goal'] else 'MISSED'}"
        )
        accs = ", ".join(f"{a:.4f}" for a in s["accs"])
        lines.append(
            f"| {s['fraction']:.0%} | {s['hidden']} | {s['mean_acc']:.4f} | {accs} | {s['drop_points']:+.2f} | {goal} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5], help="ResNet-18 channel fractions")
    parser.add_argument("--mlp-fractions", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="ResNet-18 batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--mlp-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json results")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.limit_batches = 1.0
    if args.smoke:
        args.seeds, args.epochs, args.limit_batches = [0], 2, 3
        args.batch, args.image_size, args.rounds, args.threads = 1, 32, 2, [1]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    command = "python benchmarks/channel_removal.py " + shlex.join(sys.argv[1:])
    print(f"# channel removal: {command}\n# CPU: {cpu_header()}\n# torch {torch.__version__}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        rows, artifacts = [], {}
        for seed in args.seeds:
            for f in [0.0, *args.mlp_fractions]:
                save = Path(tmp) / f"mlp_{f:g}.pt" if seed == args.seeds[0] and f else None
                row = fit_digits(f, seed, args, save)
                rows.append(row)
                if save is not None:
                    artifacts[f"slim_{f:.0%}"] = str(save)
                print(
                    f"digits seed {seed} hidden pruned {f:.0%}: acc {row['test_acc']:.4f} hidden {row['hidden']}",
                    flush=True,
                )
        dense = statistics.fmean(r["test_acc"] for r in rows if r["fraction"] == 0)
        summary = []
        for f in [0.0, *args.mlp_fractions]:
            mine = [r for r in rows if r["fraction"] == f]
            mean = statistics.fmean(r["test_acc"] for r in mine)
            goal = ACC_GOAL.get(f)
            drop = (dense - mean) * 100
            summary.append(
                {
                    "fraction": f,
                    "hidden": mine[0]["hidden"],
                    "mean_acc": mean,
                    "accs": [r["test_acc"] for r in mine],
                    "drop_points": drop,
                    "goal_points": goal,
                    "meets_goal": None if goal is None else drop <= goal,
                }
            )
        latency = []
        for threads in args.threads:
            res, shown = latency_child(threads, args, artifacts)
            res["launched_as"] = shown
            latency.append(res)
            r = res["resnet18"]
            print(
                f"{shown}: resnet18 dense {r['dense_ms']:.1f} ms; "
                + "; ".join(
                    f"{k} {v['latency_ratio']:.3f}x (err {v['rel_err_vs_masked']:.1e})"
                    for k, v in r["variants"].items()
                ),
                flush=True,
            )
    result = {
        "command": command,
        "cpu": cpu_header(),
        "torch": torch.__version__,
        "shared_machine": "yes: other agents ran on the same 2 cores; figures are medians over interleaved rounds",
        "resnet18_input": [args.batch, 3, args.image_size, args.image_size],
        "rounds": args.rounds,
        "digits": {"epochs": args.epochs, "seeds": args.seeds, "rows": rows, "summary": summary},
        "latency": latency,
        "seconds": time.perf_counter() - started,
    }
    tab, acc = table(result), acc_table(summary)
    print(tab)
    print(acc)
    from lightning_compress.core.files import atomic_write_text

    base = "channel_removal_smoke" if args.smoke else "channel_removal"
    md = (
        f"# Channel removal\n\n`{command}` ({result['seconds']:.0f} s)\n\n"
        f"CPU: {result['cpu']}; torch {torch.__version__}.\n"
        f"The machine was shared with other agents: each latency is the median of {args.rounds} interleaved rounds.\n\n"
        f"ResNet-18 input {args.batch}x3x{args.image_size}x{args.image_size} float32, eval mode; digits MLP batch "
        f"{args.mlp_batch}.\n\n{tab}\n\n## Digits MLP accuracy ({args.epochs} epochs, seeds {args.seeds})\n\n{acc}\n"
    )
    atomic_write_text(args.out / f"{base}.md", md)
    atomic_write_text(args.out / f"{base}.json", json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
