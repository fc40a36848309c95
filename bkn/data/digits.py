"""scikit-learn's bundled 8×8 handwritten digits: real data that is always available (the demo default).

1,797 grey images of 10 classes, split once into 1,437 train / 360 test examples, stratified and
with a fixed seed, so every run and every machine sees the same split.
"""

from __future__ import annotations

import torch

from bkn.data.base import DataError, Datasets, ImageTensorDataset
from bkn.data.transforms import resize_images, tensor_transform

DIGITS_SIZE = 8
DIGITS_COUNT = 1797
NUM_CLASSES = 10
DIGITS_MAX_VALUE = 16.0  # the pixels are counts of set bits in 4x4 blocks: 0..16


def build_digits(
    *,
    root: str,
    image_size: int | None,
    download: bool,
    augment: bool = True,
    test_size: int = 360,
    split_seed: int = 0,
) -> Datasets:
    """Digits scaled to [0, 1], normalized with the training split's mean/std, upscaled to
    ``image_size`` once if asked; training images shift by up to one original pixel (no flip:
    a mirrored digit is another symbol). ``root`` and ``download`` are unused: the data is bundled."""
    if not NUM_CLASSES <= test_size <= DIGITS_COUNT - NUM_CLASSES:
        raise DataError(
            f"data.test_size={test_size} for digits; a stratified split needs "
            f"{NUM_CLASSES}..{DIGITS_COUNT - NUM_CLASSES} test examples"
        )
    # Imported here: scikit-learn takes seconds to import and only this data set needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    labels = torch.tensor(digits.target)
    train_index, test_index = train_test_split(
        range(len(labels)), test_size=test_size, stratify=digits.target, random_state=split_seed
    )
    image_size = image_size or DIGITS_SIZE
    images = resize_images(images, image_size)
    train_images = images[train_index]
    mean, std = [train_images.mean().item()], [train_images.std().item()]
    splits = [
        ImageTensorDataset(
            images[index], labels[index],
            tensor_transform(mean, std, image_size=image_size, augment=train and augment, flip=False),
        )
        for index, train in ((train_index, True), (test_index, False))
    ]
    return Datasets(splits[0], splits[1], NUM_CLASSES, image_size=image_size, channels=1)
