"""CIFAR-10 and CIFAR-100 from their standard python pickles, read by our own small reader.

torchvision's CIFAR classes check the md5 of every file, so they reject the small files the
tests write in the very same format; torchvision is used here only to download (``download=True``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from bkn.data.base import DataError, Datasets, ImageTensorDataset
from bkn.data.transforms import resize_images, tensor_transform

CIFAR_SIZE = 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and how they name things."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    downloader: type[CIFAR10]


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "labels", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10,
    ),
    "cifar100": CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), "test",
        "fine_labels", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), CIFAR100,
    ),
}


def read_cifar_pickle(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of one CIFAR batch file."""
    try:
        with open(path, "rb") as file:
            # The files are Python 2 pickles: encoding="bytes" turns their str keys into bytes.
            batch: dict[Any, Any] = pickle.load(file, encoding="bytes")
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
        images = data.reshape(len(data), 3, CIFAR_SIZE, CIFAR_SIZE)
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise DataError(
            f"corrupt CIFAR file {path}: {type(error).__name__}: {error}; delete it and fetch the data set again"
        ) from None
    if labels.shape != (len(images),):
        raise DataError(f"corrupt CIFAR file {path}: {len(images)} images but {labels.size} labels; fetch it again")
    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_split(directory: Path, files: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_cifar_pickle(directory / name, label_key) for name in files]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def build_cifar(
    name: str, *, root: str, image_size: int | None, download: bool, augment: bool = True
) -> Datasets:
    """CIFAR-10/100: pad-4 random crop + horizontal flip for training (if ``augment``), per-channel
    mean/std normalization; ``image_size`` other than 32 resizes every image once at load."""
    layout = CIFAR_LAYOUTS[name]
    directory = Path(root) / layout.folder
    needed = [directory / file for file in (*layout.train_files, layout.test_file)]
    if download and any(not path.is_file() for path in needed):
        try:
            layout.downloader(root, download=True)
        except OSError as error:  # no network, a proxy, a full disk: all arrive as OSError
            raise DataError(
                f"downloading {layout.title} into {root} failed: {error}; put the files there by hand"
            ) from None
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise DataError(
            f"{layout.title} not found: looked for {', '.join(missing)}; put the python version of "
            f"{layout.title} there (data.root={root}) or pass data.download=true (needs internet)"
        )
    image_size = image_size or CIFAR_SIZE
    splits = []
    for files, train in ((layout.train_files, True), ((layout.test_file,), False)):
        images, labels = _read_split(directory, files, layout.label_key)
        out_of_range = labels[(labels < 0) | (labels >= layout.num_classes)]
        if len(out_of_range):
            raise DataError(
                f"corrupt {layout.title} labels in {directory}: {int(out_of_range[0])} is not in "
                f"0..{layout.num_classes - 1}; fetch the data set again"
            )
        transform = tensor_transform(
            layout.mean, layout.std, image_size=image_size, augment=train and augment, flip=True
        )
        splits.append(ImageTensorDataset(resize_images(images, image_size), labels, transform))
    return Datasets(splits[0], splits[1], layout.num_classes, image_size, channels=3)
