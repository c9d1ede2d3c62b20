from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from mnist_files import write_tiny_mnist

from lightning_compress import CompressionConfigError
from lightning_compress.demo import (
    MLP,
    Classifier,
    DigitsDataModule,
    EpochShuffleSampler,
    MNISTDataModule,
    SmallCNN,
)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    return tmp_path, write_tiny_mnist(tmp_path)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), torch.stack(ys)


def test_mnist_matches_torchvision_transforms(tiny_mnist):
    """Our in-memory normalization equals torchvision's own ToTensor + Normalize pipeline."""
    from torchvision import transforms
    from torchvision.datasets import MNIST

    root, data = tiny_mnist
    dm = MNISTDataModule(data_dir=str(root), batch_size=8, download=True)  # files exist: nothing is fetched
    dm.prepare_data()
    dm.setup("fit")
    reference = MNIST(
        str(root),
        train=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
    )
    x, y = _stack(dm.test_set)
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    for i in range(len(reference)):
        ref_x, ref_y = reference[i]
        torch.testing.assert_close(x[i], ref_x, rtol=0, atol=1e-6)
        assert y[i].item() == ref_y == data["test_y"][i].item()


def test_mnist_split_is_seeded_disjoint_and_complete(tiny_mnist):
    root, data = tiny_mnist
    dm = MNISTDataModule(data_dir=str(root), val_fraction=0.25, seed=3, download=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (36, 12)
    train_x, _ = _stack(dm.train_set)
    val_x, _ = _stack(dm.val_set)
    raw = (data["train_x"].float() / 255 - 0.1307) / 0.3081
    # every training image lands in exactly one of the two sets
    together = torch.cat([train_x, val_x]).flatten(1)
    matches = (together[:, None, :] - raw.flatten(1)[None]).abs().amax(-1) < 1e-5
    assert matches.sum(0).tolist() == [1] * 48 and matches.sum(1).tolist() == [1] * 48

    again = MNISTDataModule(data_dir=str(root), val_fraction=0.25, seed=3, download=False)
    again.setup()
    torch.testing.assert_close(_stack(again.val_set)[0], val_x, rtol=0, atol=0)
    other = MNISTDataModule(data_dir=str(root), val_fraction=0.25, seed=4, download=False)
    other.setup()
    assert not torch.equal(_stack(other.val_set)[0], val_x)


def test_mnist_loaders_shuffle_per_epoch(tiny_mnist):
    root, _ = tiny_mnist
    dm = MNISTDataModule(data_dir=str(root), batch_size=4, val_fraction=0.25, download=False)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffleSampler)
    first = torch.cat([y for _, y in loader])
    loader.sampler.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    assert sorted(first.tolist()) == sorted(second.tolist()) and not torch.equal(first, second)
    assert [len(y) for _, y in dm.test_dataloader()] == [4, 4, 4, 4]


@pytest.mark.parametrize("backbone", [MLP(in_features=784, hidden=(16,)), SmallCNN(channels=(4, 8))])
def test_mnist_trains_a_classifier(tiny_mnist, tmp_path, backbone):
    root, _ = tiny_mnist
    model = Classifier(backbone=backbone)
    dm = MNISTDataModule(data_dir=str(root), batch_size=16, val_fraction=0.25, download=False)
    trainer = quiet_trainer(tmp_path, max_epochs=1, num_sanity_val_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, dm)
    (metrics,) = trainer.test(model, dm, verbose=False)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_mnist_without_data_and_no_download(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path / "nothing"), download=False)
    with pytest.raises(
        CompressionConfigError, match=r"Expected argument `data_dir` to be a folder holding MNIST.*download=True"
    ):
        dm.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"Expected argument `batch_size` to be an integer in \[1, inf\), but got 0"),
        ({"val_fraction": 0.6}, r"Expected argument `val_fraction` to be a number in \(0, 0.5\], but got 0.6"),
        ({"num_workers": -1}, r"Expected argument `num_workers` to be an integer in \[0, inf\), but got -1"),
    ],
)
def test_mnist_rejects_bad_arguments(kwargs, match):
    with pytest.raises(CompressionConfigError, match=match):
        MNISTDataModule(**kwargs)


def test_missing_torchvision_names_the_demo_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(
        ImportError, match=r'torchvision, which is not installed.*pip install "lightning-compress\[demo\]"'
    ):
        MNISTDataModule(data_dir=str(tmp_path)).prepare_data()


def test_missing_scikit_learn_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(
        ImportError, match=r'scikit-learn, which is not installed.*pip install "lightning-compress\[demo\]"'
    ):
        DigitsDataModule().prepare_data()


def test_digits_split_is_seeded_and_disjoint():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sum(sizes) == 1797 and sizes[2] == 269
    again = DigitsDataModule(seed=0)
    again.setup()
    torch.testing.assert_close(again.test_set.tensors[0], dm.test_set.tensors[0], rtol=0, atol=0)
    from sklearn.datasets import load_digits

    union = sorted(tuple(x.flatten().tolist()) for s in (dm.train_set, dm.val_set, dm.test_set) for x in s.tensors[0])
    full = sorted(
        tuple((torch.tensor(img, dtype=torch.float32) / 16.0).flatten().tolist()) for img in load_digits().images
    )
    assert union == full  # the three sets partition the data set


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(10, seed=1), EpochShuffleSampler(10, seed=1)
    torch.manual_seed(123)  # the global random state plays no part
    assert list(a) == list(b) and sorted(a) == list(range(10)) and len(a) == 10
    b.set_epoch(1)
    assert list(a) != list(b)
