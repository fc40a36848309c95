"""Deterministic random images with learnable class structure, for smoke tests and benchmarks.

Each class has a smooth random prototype (a ``4×4`` random pattern upsampled to the image size);
an example is its class's prototype plus independent uniform pixel noise. Example ``i`` has label
``i % num_classes`` and its noise comes from a numpy generator seeded by ``(seed, split, i)``, so the
data set is the same on every machine and costs no memory however large the images are.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from bkn.data.base import DataError, Datasets

PROTOTYPE_SIZE = 4
UNIFORM_TO_UNIT_STD = 12**0.5  # a uniform variable on [0, 1) has variance 1/12


class SyntheticImages(Dataset):
    """``size`` examples drawn around ``prototypes`` (``(K, C, 4, 4)``); images are generated on access."""

    def __init__(self, prototypes: Tensor, size: int, image_size: int, noise: float, seed: tuple[int, int]):
        self.prototypes = prototypes
        self.size = size
        self.noise = noise
        self.seed = seed
        # Bilinear upsampling is separable: rows and columns each mix by this (image_size, 4)
        # matrix, so upsampling one prototype is two tiny matmuls instead of an interpolate call.
        self.upsample = F.interpolate(
            torch.eye(PROTOTYPE_SIZE).unsqueeze(0), size=image_size, mode="linear", align_corners=False
        )[0].T

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic examples")
        label = index % len(self.prototypes)
        prototype = self.upsample @ self.prototypes[label] @ self.upsample.T
        # Uniform noise (4x cheaper to draw than Gaussian) rescaled to standard deviation 1.
        uniform = np.random.default_rng((*self.seed, index)).random(prototype.shape, dtype=np.float32)
        return prototype + self.noise * UNIFORM_TO_UNIT_STD * (torch.from_numpy(uniform) - 0.5), label


def build_synthetic(
    *,
    root: str,
    image_size: int | None,
    download: bool,
    num_classes: int = 10,
    channels: int = 3,
    train_size: int = 1024,
    test_size: int = 256,
    noise: float = 1.0,
    seed: int = 0,
) -> Datasets:
    """The synthetic set (default 32×32×3, 10 classes, 1,024 / 256 examples); ``noise`` is the
    pixel noise's standard deviation against prototypes of unit scale. ``root``/``download`` unused."""
    image_size = image_size or 32
    for setting, value in (("num_classes", num_classes), ("channels", channels), ("train_size", train_size),
                           ("test_size", test_size), ("image_size", image_size)):
        if value < 1:
            raise DataError(f"data.{setting}={value} for the synthetic data set; it must be at least 1")
    if noise < 0:
        raise DataError(f"data.noise={noise} for the synthetic data set; it must be at least 0")
    if seed < 0:
        raise DataError(f"data.seed={seed} for the synthetic data set; it must be at least 0")
    # numpy's SeedSequence mixes the tuples (seed, stream, ...), so every stream is independent.
    prototype_shape = (num_classes, channels, PROTOTYPE_SIZE, PROTOTYPE_SIZE)
    prototypes = torch.from_numpy(np.random.default_rng((seed, 0)).standard_normal(prototype_shape, dtype=np.float32))
    # Train and test share the prototypes and draw their noise from different streams.
    train = SyntheticImages(prototypes, train_size, image_size, noise, seed=(seed, 1))
    test = SyntheticImages(prototypes, test_size, image_size, noise, seed=(seed, 2))
    return Datasets(train, test, num_classes, image_size, channels)
