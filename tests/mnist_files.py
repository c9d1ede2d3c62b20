"""A miniature MNIST in torchvision's file layout, so the real torchvision loading code runs in tests."""

from __future__ import annotations

import struct
from pathlib import Path

import torch


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor in MNIST's big-endian idx format (magic 0x08 = ubyte, then the dims)."""
    header = struct.pack(">HBB", 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


def write_tiny_mnist(root: Path, n_train: int = 48, n_test: int = 16) -> dict[str, torch.Tensor]:
    """Random 28x28 images with labels 0..9 under ``root/MNIST/raw``, readable by ``torchvision.datasets.MNIST``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    data = {
        "train_x": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_y": torch.arange(n_train, dtype=torch.uint8) % 10,
        "test_x": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_y": torch.arange(n_test, dtype=torch.uint8) % 10,
    }
    write_idx(raw / "train-images-idx3-ubyte", data["train_x"])
    write_idx(raw / "train-labels-idx1-ubyte", data["train_y"])
    write_idx(raw / "t10k-images-idx3-ubyte", data["test_x"])
    write_idx(raw / "t10k-labels-idx1-ubyte", data["test_y"])
    return data
