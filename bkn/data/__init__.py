"""Data sets and loaders: ``build_datasets(name, ...)`` gives the train/test splits and their
shape facts; ``bkn.data.loaders`` turns a split into a (distributed, resumable) DataLoader."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from bkn.data.base import DataError, Datasets, ImageTensorDataset
from bkn.data.cifar import build_cifar
from bkn.data.digits import build_digits
from bkn.data.fashion_mnist import build_fashion_mnist
from bkn.data.folder import build_folder
from bkn.data.imagenet import build_imagenet
from bkn.data.loaders import build_loader, measure_loader_throughput, set_epoch
from bkn.data.synthetic import build_synthetic

DEFAULT_ROOT = "data"

# Every builder takes root, image_size and download as keywords, then its own options.
BUILDERS: dict[str, Callable[..., Datasets]] = {
    "cifar10": partial(build_cifar, "cifar10"),
    "cifar100": partial(build_cifar, "cifar100"),
    "imagenet": build_imagenet,
    "digits": build_digits,
    "fashion_mnist": build_fashion_mnist,
    "synthetic": build_synthetic,
    "folder": build_folder,
}


def build_datasets(
    name: str, root: str | None = None, image_size: int | None = None, download: bool = False, **options: Any
) -> Datasets:
    """The train and test splits of data set ``name`` (one of ``BUILDERS``), read under ``root``
    (default ``./data``); ``image_size`` None keeps the data set's native size (224 for ImageNet)."""
    if name not in BUILDERS:
        raise DataError(f"unknown data set {name!r}; choose data=... from {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    accepted = set(inspect.signature(builder).parameters) - {"root", "image_size", "download"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"unknown option(s) data.{', data.'.join(unknown)} for data set {name!r}; "
            f"it accepts {', '.join(sorted(accepted)) or 'no options'} besides root, image_size, download"
        )
    if image_size is not None and image_size < 1:
        raise DataError(f"data.image_size={image_size}; use a positive size or null for the native one")
    return builder(root=root or DEFAULT_ROOT, image_size=image_size, download=download, **options)


__all__ = [
    "BUILDERS", "DataError", "Datasets", "ImageTensorDataset", "build_datasets", "build_loader",
    "measure_loader_throughput", "set_epoch",
]
