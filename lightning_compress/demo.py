"""Small models and data modules for the embedded default (scikit-learn's digits) and for MNIST.

Everything built on the digits runs on two CPU cores in seconds and needs no download: the data set
(1,797 8x8 images) ships inside scikit-learn. :class:`MNISTDataModule` downloads MNIST through
torchvision on first use. Both come with the ``demo`` extra: ``pip install "lightning-compress[demo]"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from typing_extensions import override

from lightning_compress.errors import check_number, config_error

__all__ = ["MLP", "Classifier", "DigitsDataModule", "EpochShuffleSampler", "MNISTDataModule", "SmallCNN"]

_DEMO_EXTRA_HINT = 'Install the demo extra: pip install "lightning-compress[demo]"'


class MLP(nn.Module):
    """A fully connected classifier over flattened images (LeNet-300-100 by default).

    Args:
        in_features: flattened input size (64 for 8x8 digits, 784 for MNIST).
        hidden: widths of the hidden layers.
        num_classes: number of outputs.
    """

    def __init__(self, in_features: int = 64, hidden: Sequence[int] = (300, 100), num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions, pooling to 4x4 and a linear classifier; any image size.

    Args:
        in_channels: image channels (1 for digits and MNIST).
        channels: output channels of the two convolutions.
        num_classes: number of outputs.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Linear(c2 * 16, num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class Classifier(pl.LightningModule):
    """A LightningModule that trains any ``nn.Module`` backbone with cross-entropy.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``
    (torchmetrics multiclass accuracy).

    Args:
        backbone: the network; :class:`MLP` over 8x8 digits when not given.
        num_classes: number of classes for the accuracy metric.
        lr: learning rate of the default Adam optimizer (the CLI's ``--optimizer`` replaces it).
        weight_decay: weight decay of the default optimizer.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_number("lr", lr, low=0.0, low_inclusive=False)
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else MLP(num_classes=num_classes)
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a seed derived from ``seed`` and the epoch, so a resumed run sees the same order.

    Lightning calls ``set_epoch`` at the start of every epoch, so the order of epoch ``e`` does not
    depend on the global random state, which a checkpoint does not restore.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation for ``epoch``."""
        self.epoch = epoch

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised by a test that hides scikit-learn
        raise ImportError(
            f"The digits data set comes from scikit-learn, which is not installed. {_DEMO_EXTRA_HINT}"
        ) from err
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def _stage_loader(
    name: str, stage: str, dataset: str, shuffle: bool = False
) -> Callable[[_SplitDataModule], DataLoader[Any]]:
    """The ``<name>_dataloader`` hook of :class:`_SplitDataModule`: ``setup(stage)``, then a loader over ``dataset``."""

    def loader(self: _SplitDataModule) -> DataLoader[Any]:
        self.setup(stage)
        return self._loader(getattr(self, dataset), shuffle=shuffle)

    loader.__name__ = f"{name}_dataloader"
    loader.__qualname__ = f"_SplitDataModule.{name}_dataloader"
    return override(loader)  # the hook of LightningDataModule


class _SplitDataModule(pl.LightningDataModule):
    """Train, validation and test sets that ``setup`` fills, and one DataLoader recipe for all of them.

    The training set is shuffled by an :class:`EpochShuffleSampler`, so a resumed run sees the same
    batches; prediction runs on the test set.
    """

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None

    def _loader(self, dataset: Dataset[Any] | None, shuffle: bool) -> DataLoader[Any]:
        if dataset is None:  # setup() always fills the three sets
            raise RuntimeError(f"{type(self).__name__}.setup() did not run")
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    train_dataloader = _stage_loader("train", "fit", "train_set", shuffle=True)
    val_dataloader = _stage_loader("val", "validate", "val_set")
    test_dataloader = _stage_loader("test", "test", "test_set")
    predict_dataloader = _stage_loader("predict", "predict", "test_set")


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes) with a seeded train/val/test split.

    Images are ``float32`` tensors of shape ``(channels, 8, 8)`` scaled to ``[0, 1]``; the split does
    not depend on the global random state.

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of the images held out for validation.
        test_fraction: fraction of the images held out for testing.
        seed: seed of the split and of the per-epoch shuffling.
        num_workers: DataLoader worker processes (0 is fastest for this tiny set).
        channels: the grey image repeated over this many channels (3 for RGB backbones such as
            torchvision's ``resnet18``).
    """

    in_memory_data = True
    """The sets are tensors in memory (:class:`~lightning_compress.pipeline.PipelineData`): no workers needed."""

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
        channels: int = 1,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_number("val_fraction", val_fraction, low=0.0, high=0.5, low_inclusive=False)
        check_number("test_fraction", test_fraction, low=0.0, high=0.5, low_inclusive=False)
        check_number("channels", channels, low=1, integer=True)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.channels = channels

    @override
    def prepare_data(self) -> None:
        _load_digits()  # fail early, with the install hint, on a machine without scikit-learn

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = _load_digits()
        x = x.expand(-1, self.channels, -1, -1).contiguous()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(y) * self.val_fraction)
        n_test = int(len(y) * self.test_fraction)
        test_idx, val_idx, train_idx = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081


class _NormalizedImages(Dataset[tuple[Tensor, Tensor]]):
    """``uint8`` images kept as they are in memory, scaled and normalized one sample at a time."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels.long()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = (self.images[index].float().div(255.0) - _MNIST_MEAN) / _MNIST_STD
        return image.unsqueeze(0), self.labels[index]

    def __len__(self) -> int:
        return len(self.labels)


def _mnist(data_dir: str, train: bool, download: bool) -> Any:
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:
        raise ImportError(
            f"MNISTDataModule reads MNIST with torchvision, which is not installed. {_DEMO_EXTRA_HINT}"
        ) from err
    try:
        return MNIST(data_dir, train=train, download=download)
    except RuntimeError as err:
        if download:
            raise
        raise config_error(
            "data_dir",
            "a folder holding MNIST (MNIST/raw/*-ubyte files)",
            data_dir,
            "Set `download=True` to fetch it.",
        ) from err


class MNISTDataModule(_SplitDataModule):
    """torchvision's MNIST (60,000 training and 10,000 test images of 28x28 digits), downloaded on first use.

    Images are ``float32`` tensors of shape ``(1, 28, 28)``, normalized with MNIST's mean and standard
    deviation. The training images are split into training and validation sets with a seeded
    permutation; the test set is MNIST's own. The images stay in memory as ``uint8`` (47 MB).
    Use :class:`MLP` with ``in_features=784`` or :class:`SmallCNN` as the backbone.

    Args:
        data_dir: where torchvision keeps the data (``<data_dir>/MNIST/raw``).
        batch_size: samples per batch.
        val_fraction: fraction of the training images held out for validation (5,000 by default).
        seed: seed of the split and of the per-epoch shuffling.
        num_workers: DataLoader worker processes.
        download: fetch the data when ``data_dir`` does not hold it yet (``prepare_data`` runs once
            per node, so processes do not download at the same time).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        val_fraction: float = 5_000 / 60_000,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = True,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        check_number("val_fraction", val_fraction, low=0.0, high=0.5, low_inclusive=False)
        self.data_dir = data_dir
        self.val_fraction = val_fraction
        self.download = download

    @override
    def prepare_data(self) -> None:
        _mnist(self.data_dir, train=True, download=self.download)
        _mnist(self.data_dir, train=False, download=self.download)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, test = _mnist(self.data_dir, True, False), _mnist(self.data_dir, False, False)
        order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, int(len(order) * self.val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        self.train_set = _NormalizedImages(train.data[train_idx], train.targets[train_idx])
        self.val_set = _NormalizedImages(train.data[val_idx], train.targets[val_idx])
        self.test_set = _NormalizedImages(test.data, test.targets)
