"""Every example config and script runs, in miniature, and prints no warning we did not expect.

Allowed: the Lightning and jsonargparse notices listed in ``lightning_compress._warnings`` (which
the command line silences and pyproject.toml ignores in every test; a plain script still shows them),
Lightning's hint that the in-memory digits loaders have no worker processes (printed only on
machines with more than two cores), and PruningCallback's warning that a layer lost every weight,
which the miniature runs provoke (see ``MINIATURE_WARNINGS``). Any other warning fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from mnist_files import write_tiny_mnist

from lightning_compress import load_compressed
from lightning_compress._warnings import HARMLESS_WARNINGS, IN_MEMORY_DATA_WARNINGS
from lightning_compress.cli import main
from lightning_compress.demo import MLP, Classifier, SmallCNN

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = EXAMPLES / "configs"
MINIATURE = [
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=5",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
COMPRESS_MINIATURE = ["--dense_epochs=1", "--latency_repeats=2"]
# In miniature the recipes prune a network trained for a handful of steps to 90 % at once; its wide
# middle layer still has its small initial weights, so one global threshold takes all of them, and
# PruningCallback says so. (The full-length runs train first and keep about 7 % of that layer.)
MINIATURE_WARNINGS = (
    (
        r"PruningCallback: at step \d+ the global magnitude masks removed every weight of"
        r" \['backbone\.net\.3\.weight'\]",
        UserWarning,
    ),
)
ALLOWED = [
    (re.compile(message, re.I), category)
    for message, category in HARMLESS_WARNINGS + IN_MEMORY_DATA_WARNINGS + MINIATURE_WARNINGS
]


@contextmanager
def no_unexpected_warnings(also: tuple[tuple[str, type[Warning]], ...] = ()) -> Iterator[None]:
    allowed = ALLOWED + [(re.compile(message, re.I), category) for message, category in also]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    unexpected = [
        w for w in caught if not any(p.match(str(w.message)) and issubclass(w.category, c) for p, c in allowed)
    ]
    assert not unexpected, "\n".join(
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in unexpected
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative paths in the configs (checkpoints, artifacts, lightning_logs) land in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-compress"])


def _run(subcommand: str, config: str, *extra: str, also: tuple[tuple[str, type[Warning]], ...] = ()) -> None:
    with no_unexpected_warnings(also):
        main([subcommand, "--config", str(CONFIGS / config), *MINIATURE, *extra])


def _checkpoint_state(root: Path) -> dict[str, torch.Tensor]:
    (path,) = sorted(root.rglob("*.ckpt"))
    return torch.load(path, weights_only=True)["state_dict"]


def _sparsity(tensors: list[torch.Tensor]) -> float:
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def _train_teacher(tmp_path: Path) -> Path:
    _run("fit", "teacher.yaml")
    teacher = tmp_path / "checkpoints" / "teacher.ckpt"
    assert teacher.is_file()
    return teacher


def test_the_allow_list_lets_nothing_else_through():
    with pytest.raises(AssertionError, match="UserWarning: something new"), no_unexpected_warnings():
        warnings.warn(
            "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider", stacklevel=1
        )
        warnings.warn("something new", stacklevel=1)
    leafspec = (
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"
        " instead."
    )
    with no_unexpected_warnings():
        warnings.warn(leafspec, FutureWarning, stacklevel=1)  # Lightning's notice, allowed
    with pytest.raises(AssertionError, match="UserWarning: `isinstance"), no_unexpected_warnings():
        warnings.warn(leafspec, UserWarning, stacklevel=1)  # same text, another kind: not allowed


def test_every_config_is_tested():
    tested = {
        "compress.yaml",
        "compress_structured.yaml",
        "mnist.yaml",
        "prune.yaml",
        "regularize_prune.yaml",
        "quantize.yaml",
        "teacher.yaml",
        "distill.yaml",
        "distill_prune_quantize.yaml",
        "distill_resnet18_mobilenet.yaml",  # tested by tests/test_distillation_cli.py
        "prune_pretrained.yaml",
    }
    assert {p.name for p in CONFIGS.glob("*.yaml")} == tested


@pytest.mark.slow
@pytest.mark.parametrize("config", ["compress.yaml", "mnist.yaml"])
def test_compress_configs(tmp_path, config):
    extra = list(COMPRESS_MINIATURE)
    if config == "mnist.yaml":
        write_tiny_mnist(tmp_path / "mnist")
        extra += ["--data.data_dir=mnist", "--data.download=false", "--data.batch_size=8"]
    _run("compress", config, *extra)
    (folder,) = (tmp_path / "lightning_logs").iterdir()
    report = json.loads((folder / "report.json").read_text())
    assert report["compressed"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert {layer["dtype"] for layer in report["compressed"]["layers"]} == {"int8"}
    assert report["ratios"]["artifact_bytes"] < 0.15
    assert (folder / "report.png").is_file()


@pytest.mark.slow
def test_compress_structured_config(tmp_path):
    _run("compress", "compress_structured.yaml", *COMPRESS_MINIATURE)
    (folder,) = (tmp_path / "lightning_logs").iterdir()
    report = json.loads((folder / "report.json").read_text())
    shapes = {layer["name"]: layer["shape"] for layer in report["compressed"]["layers"]}
    assert shapes == {"backbone.net.1": [150, 64], "backbone.net.3": [50, 150], "backbone.net.5": [10, 50]}
    assert {layer["dtype"] for layer in report["compressed"]["layers"]} == {"int8"}
    assert report["compressed"]["params"] < 0.36 * report["original"]["params"]
    assert report["compressed"]["latency_ms"] > 0 and report["ratios"]["latency"] > 0  # measured, not asserted
    model = load_compressed(folder / "compressed.pt", Classifier())  # a freshly built full model
    assert model.backbone.net[1].out_features == 150
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_prune_config(tmp_path):
    _run("fit", "prune.yaml")
    state = _checkpoint_state(tmp_path / "lightning_logs")
    weights = [state[f"backbone.net.{i}.weight"] for i in (1, 3, 5)]
    assert _sparsity(weights) == pytest.approx(0.9, abs=0.005)
    Classifier().load_state_dict(state, strict=True)  # the model's own keys


@pytest.mark.slow
def test_regularize_prune_config(tmp_path):
    _run("fit", "regularize_prune.yaml")
    state = _checkpoint_state(tmp_path / "lightning_logs")
    for key in ("backbone.features.0.weight", "backbone.features.2.weight"):
        channel_zero = (state[key].flatten(1) == 0).all(dim=1)
        assert channel_zero.float().mean().item() == pytest.approx(0.5, abs=0.1), key
    assert _sparsity([state["backbone.classifier.weight"]]) < 0.01  # excluded: stays dense


# Ten steps leave the CNN's logits nearly tied, so static int8 (activations on calibrated grids too)
# flips a few of them and QuantizeOnFitEnd says so; the full 20 epochs agree at 100 % (rel. error 0.0045).
MINIATURE_STATIC = (
    (
        r"QuantizeOnFitEnd: the int8 model agrees poorly with the float one .*top-1 agreement 9\d\.\d+% < 99%",
        UserWarning,
    ),
)


@pytest.mark.slow
def test_quantize_config(tmp_path):
    _run("fit", "quantize.yaml", also=MINIATURE_STATIC)
    artifact = tmp_path / "smallcnn.int8.pt"
    model = load_compressed(artifact, Classifier(backbone=SmallCNN()))
    assert {type(m).__name__ for m in model.modules()} >= {"Int8Conv2d", "Int8Linear"}
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_prune_pretrained_config(tmp_path):
    pytest.importorskip("transformers")
    import yaml

    config = yaml.safe_load((CONFIGS / "prune_pretrained.yaml").read_text())
    tiny = {"path": None, "vocab_size": 200, "hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32}
    for role in ("student", "teacher"):  # a tiny BERT instead of the real MiniLM, same recipe
        config["model"]["init_args"][role]["init_args"] = tiny
    pairs = config["model"]["init_args"]["feature_pairs"]
    assert len(pairs) == 6  # MiniLM's six layers; the tiny BERT has one
    config["model"]["init_args"]["feature_pairs"] = {k: v for k, v in pairs.items() if k.endswith(".0")}
    config["data"]["init_args"].update(tokenizer=None, vocab_size=200, batch_size=8, held_out=16, train_sentences=40)
    config["trainer"]["callbacks"][0]["init_args"].update(update_every_n_steps=2, score_batches=2)
    path = tmp_path / "prune_pretrained_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    with no_unexpected_warnings():
        main(["fit", "--config", str(path), *MINIATURE])
    state = _checkpoint_state(tmp_path / "lightning_logs")
    assert {key.split(".")[0] for key in state} == {"student", "feature_projections"}
    linears = [
        v for k, v in state.items() if k.startswith("student.") and k.endswith("weight") and v.dim() == 2
        and "embeddings" not in k
    ]  # fmt: skip
    assert len(linears) == 6  # q, k, v, attention output, intermediate, output
    for weight in linears:  # every output row exactly half zero
        assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()


@pytest.mark.slow
def test_distill_config(tmp_path):
    _train_teacher(tmp_path)
    _run("fit", "distill.yaml")
    state = _checkpoint_state(tmp_path / "lightning_logs" / "version_1")
    assert {key.split(".")[0] for key in state} == {"student"}
    assert state["student.net.1.weight"].shape == (32, 64)


@pytest.mark.slow
def test_distill_prune_quantize_config(tmp_path):
    _train_teacher(tmp_path)
    _run("fit", "distill_prune_quantize.yaml")
    student = load_compressed(tmp_path / "student.int8.pt", MLP(hidden=[64]))
    int8 = [m for m in student.modules() if type(m).__name__ == "Int8Linear"]
    assert len(int8) == 2
    assert _sparsity([m.weight for m in int8]) == pytest.approx(0.8, abs=0.01)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_pipeline_script(tmp_path, capsys):
    script = _load_script("pipeline")
    with no_unexpected_warnings():
        results = script.main(["--smoke", "--out", str(tmp_path / "artifacts")])
    names = [name for name, _ in results]
    assert names == [
        "dense MLP (float32)",
        "dense MLP, int8",
        "pruned 90% (float32)",
        "pruned 90% + int8",
        "distilled student 64-32-10",
        "distilled 64-64-10, pruned 80% + int8",
    ]
    m = dict(results)
    dense, pruned, both = m["dense MLP (float32)"], m["pruned 90% (float32)"], m["pruned 90% + int8"]
    assert pruned.report.sparsity == pytest.approx(0.9, abs=0.005) and pruned.weight_bytes == dense.weight_bytes
    assert both.nonzero_params == pruned.nonzero_params  # the zeros survive int8
    assert both.weight_bytes < 0.3 * dense.weight_bytes and both.artifact_bytes < 0.12 * dense.artifact_bytes
    assert m["distilled 64-64-10, pruned 80% + int8"].report.sparsity == pytest.approx(0.8, abs=0.01)
    out = capsys.readouterr().out
    assert all(name in out for name in names) and "artifact" in out
    assert len(list((tmp_path / "artifacts").glob("*.pt"))) == 6
