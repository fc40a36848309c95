"""Per-example transforms (cheap tensor ops via torchvision.transforms.v2) and the one-off resize.

CIFAR, digits and ImageNet share the same two augmentations the paper's lineage uses: a random
shift (pad by 1/8 of the side, random crop back) or a random resized crop, then a horizontal flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shift_padding(image_size: int) -> int:
    """Padding of the random-shift augmentation: 4 pixels at CIFAR's 32, 1 pixel at digits' 8."""
    return max(1, round(image_size / 8))


def tensor_transform(
    mean: Sequence[float], std: Sequence[float], *, image_size: int, augment: bool, flip: bool,
    noise_std: float = 0.0,
) -> v2.Compose:
    """``(C, H, W)`` uint8 or [0, 1] float image → normalized float32, optionally shifted and
    flipped, and with fresh Gaussian pixel noise of ``noise_std`` (in [0, 1] units) on every draw."""
    steps: list[v2.Transform] = []
    if augment:
        steps.append(v2.RandomCrop(image_size, padding=shift_padding(image_size)))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if noise_std:
        steps.append(v2.GaussianNoise(sigma=noise_std, clip=False))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def imagenet_transform(image_size: int, *, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """The standard ImageNet pipeline for a PIL image: random resized crop + flip for training,
    resize to ``image_size * 256 / 224`` + center crop for validation; ImageNet's mean/std unless given."""
    if train:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose([v2.ToImage(), *geometry, *normalize])


def resize_images(images: Tensor, image_size: int) -> Tensor:
    """Resize a whole ``(N, C, H, W)`` tensor once at construction, so no example pays for it."""
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return v2.functional.resize(images, [image_size, image_size], antialias=True)
