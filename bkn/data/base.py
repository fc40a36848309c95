"""What every data set builder returns, the one error class for bad data, and the in-memory
image data set that CIFAR, digits and the tests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data set is missing, corrupt or misconfigured; the message says which file and the fix."""


@dataclass(frozen=True)
class Datasets:
    """The train and test splits of one data set and the shape facts a model needs."""

    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    channels: int
    # Your own files (data=folder): a hash of each split's file list, their counts, the mean and std,
    # recorded with the run so that a resumed run can tell whether they changed.
    files: dict[str, Any] | None = None


class ImageTensorDataset(Dataset):
    """Images held in one ``(N, C, H, W)`` tensor with integer labels; ``transform`` runs per example.

    Keeping the images as one uint8 (or float) tensor keeps CIFAR at 150 MB and makes
    ``__getitem__`` a view plus the augmentation, so data loading never limits small models.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor] | None = None):
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"images must be (N, C, H, W) and labels (N,); got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
