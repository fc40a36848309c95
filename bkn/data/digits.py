"""scikit-learn's bundled 8×8 handwritten digits: real data that is always available (the demo default).

1,797 grey images of 10 classes, split once into 1,437 train / 360 test examples, stratified and
with a fixed seed, so every run and every machine sees the same split. A harder variant of the
same data (configs/data/digits_hard.yaml) keeps fewer training images per class and adds Gaussian
pixel noise: fresh noise to every training draw, one fixed draw to the test images.
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
    train_per_class: int | None = None,
    noise_std: float = 0.0,
) -> Datasets:
    """Digits scaled to [0, 1], normalized with the training split's mean/std, upscaled to
    ``image_size`` once if asked; training images shift by up to one original pixel (no flip:
    a mirrored digit is another symbol). ``train_per_class`` keeps the first that many training
    images of each class; ``noise_std`` adds Gaussian noise of that std (in [0, 1] pixel units).
    ``root`` and ``download`` are unused: the data is bundled."""
    if not NUM_CLASSES <= test_size <= DIGITS_COUNT - NUM_CLASSES:
        raise DataError(
            f"data.test_size={test_size} for digits; a stratified split needs "
            f"{NUM_CLASSES}..{DIGITS_COUNT - NUM_CLASSES} test examples"
        )
    if train_per_class is not None and train_per_class < 1:
        raise DataError(f"data.train_per_class={train_per_class}; use a positive count or null for all images")
    if noise_std < 0:
        raise DataError(f"data.noise_std={noise_std}; use a standard deviation >= 0 (0: no noise)")
    # Imported here: scikit-learn takes seconds to import and only this data set needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX_VALUE
    labels = torch.tensor(digits.target)
    train_index, test_index = train_test_split(
        range(len(labels)), test_size=test_size, stratify=digits.target, random_state=split_seed
    )
    if train_per_class is not None:  # the first N of each class in the split's order, class by class
        chosen = [[i for i in train_index if digits.target[i] == c][:train_per_class] for c in range(NUM_CLASSES)]
        train_index = [i for of_class in chosen for i in of_class]
    image_size = image_size or DIGITS_SIZE
    images = resize_images(images, image_size)
    train_images = images[train_index]
    test_images = images[test_index]
    if noise_std:
        noise = torch.randn(test_images.shape, generator=torch.Generator().manual_seed(split_seed))
        test_images = test_images + noise_std * noise
    mean, std = [train_images.mean().item()], [train_images.std().item()]
    train_set = ImageTensorDataset(train_images, labels[train_index], tensor_transform(
        mean, std, image_size=image_size, augment=augment, flip=False, noise_std=noise_std))
    test_set = ImageTensorDataset(test_images, labels[test_index], tensor_transform(
        mean, std, image_size=image_size, augment=False, flip=False))
    return Datasets(train_set, test_set, NUM_CLASSES, image_size=image_size, channels=1)
