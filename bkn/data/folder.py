"""Your own images in class folders (``data=folder``): ``root/train/<class>/*`` and
``root/val/<class>/*``, or one ``root/<class>/*`` split into train and test by a seeded, per-class
fraction. Any format torchvision's ``ImageFolder`` takes (JPEG, PNG, WebP, BMP, TIFF, ...) is read
as RGB, with ImageNet's augmentation and the data set's own mean and standard deviation: computed
from its training images unless given. Every file of both splits is checked before training (an
unreadable one would otherwise stop the run when first read, for a test image after the last
step), and the file lists and normalization are recorded (``Datasets.files``) so that a resumed
run can refuse a folder that changed under it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2.functional import pil_to_tensor

from bkn.data.base import DataError, Datasets
from bkn.data.imagenet import check_class_folders, load_rgb
from bkn.data.transforms import imagenet_transform

log = logging.getLogger("bkn")

CHECK_THREADS = 8
SHOWN_UNREADABLE = 3  # unreadable files named in the message (all are counted)
STATISTICS_IMAGES = 1000  # at most this many training images, spread evenly, give the mean and std


def split_indices(targets: Sequence[int], val_fraction: float, split_seed: int) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices: ``round(val_fraction * n)`` random images of each class's ``n`` for val."""
    generator = torch.Generator().manual_seed(split_seed)
    train, val = [], []
    for label in sorted(set(targets)):
        members = [index for index, target in enumerate(targets) if target == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        held_out = round(val_fraction * len(members))
        val += [members[i] for i in order[:held_out]]
        train += [members[i] for i in order[held_out:]]
    return sorted(train), sorted(val)


def channel_statistics(paths: Sequence[str]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the pixels (in [0, 1]) of up to
    ``STATISTICS_IMAGES`` of ``paths``, spread evenly over them."""
    step = max(1, len(paths) // STATISTICS_IMAGES)
    total, total_squares, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for path in paths[::step][:STATISTICS_IMAGES]:
        pixels = pil_to_tensor(load_rgb(path)).flatten(1).to(torch.float64) / 255
        total += pixels.sum(dim=1)
        total_squares += pixels.square().sum(dim=1)
        count += pixels.shape[1]
    mean = total / count
    std = (total_squares / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def _unreadable(path: str) -> str | None:
    """Why ``path`` is no image, or None: its header is parsed and the file checked as far as PIL's
    ``verify`` goes (a PNG's chunks and checksums; for JPEG the header only), without decoding it."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001 - PIL reports a bad file with many exception types
        return f"{type(error).__name__}: {str(error).replace(f' {path!r}', '')}"  # the path is named already
    return None


def check_images(paths: Sequence[str], root: str) -> None:
    """Every file of both splits opens as an image (threads: the work is mostly file reads), else
    one DataError naming the first few unreadable files and their count."""
    with ThreadPoolExecutor(max_workers=min(CHECK_THREADS, max(1, len(paths)))) as pool:
        reasons = list(pool.map(_unreadable, paths))
    bad = [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]
    if bad:
        named = "; ".join(f"{path} ({reason})" for path, reason in bad[:SHOWN_UNREADABLE])
        more = f" and {len(bad) - SHOWN_UNREADABLE} more" if len(bad) > SHOWN_UNREADABLE else ""
        raise DataError(f"{len(bad)} of {len(paths)} images under data.root={root} cannot be read: {named}{more}; "
                        f"replace or delete them (a run already started then refuses to continue on the changed "
                        f"folder and says how to proceed)")


def file_record(train_paths: Sequence[str], test_paths: Sequence[str], root: str, mean: Sequence[float],
                std: Sequence[float]) -> dict[str, Any]:
    """What a run records of its files: a SHA-256 of both splits' file lists (relative to ``root``),
    their counts and the normalization computed from them."""
    digest = hashlib.sha256()
    for split, paths in (("train", train_paths), ("test", test_paths)):
        for path in paths:
            digest.update(f"{split}\t{os.path.relpath(path, root)}\n".encode())
    return {"sha256": digest.hexdigest(), "train": len(train_paths), "test": len(test_paths),
            "mean": list(mean), "std": list(std)}


def _given(name: str, value: Sequence[float] | None) -> list[float] | None:
    if value is None:
        return None
    values = list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values) or (name == "std" and min(values) <= 0):
        raise DataError(f"data.{name}={values}: expected three numbers (R, G, B; pixels in [0, 1])"
                        f"{', all positive' if name == 'std' else ''}, or null to compute it from the training images")
    return [float(v) for v in values]


def build_folder(*, root: str, image_size: int | None, download: bool, augment: bool = True,
                 val_fraction: float = 0.2, split_seed: int = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Datasets:
    """Class folders under ``root``: ``train/`` and ``val/``, or the classes themselves, of which
    ``val_fraction`` of each class (drawn with ``split_seed``) becomes the test split."""
    if download:
        raise DataError("data=folder reads your own images, there is nothing to download; pass data.download=false")
    if image_size is None:
        raise DataError("data=folder needs an image size: set data.image_size (e.g. 224, or 64 for a quick run)")
    mean, std = _given("mean", mean), _given("std", std)
    train_dir, val_dir = Path(root) / "train", Path(root) / "val"
    if train_dir.is_dir() or val_dir.is_dir():
        found, missing = (train_dir, val_dir) if train_dir.is_dir() else (val_dir, train_dir)
        if not missing.is_dir():
            raise DataError(f"{found} is there but {missing} is not; add {missing.name}/ with the same class folders, "
                            f"or put the class folders themselves under data.root={root} to split them by "
                            f"data.val_fraction")
        train_classes, val_classes = check_class_folders(train_dir), check_class_folders(val_dir)
        if train_classes != val_classes:
            only = sorted(set(train_classes) ^ set(val_classes))
            raise DataError(f"the class folders of {train_dir} and {val_dir} differ (e.g. {only[:3]}); "
                            "both splits need the same classes")
        train_root, val_root, split = train_dir, val_dir, None
    else:
        check_class_folders(Path(root))
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction}: expected a fraction in (0, 1) of each class's images "
                            "to hold out for testing")
        train_root = val_root = Path(root)
        split = split_indices(ImageFolder(root, loader=load_rgb).targets, val_fraction, split_seed)

    train_set = ImageFolder(str(train_root), loader=load_rgb)
    train_paths = [path for path, _ in train_set.samples]
    test_set = ImageFolder(str(val_root), loader=load_rgb)
    test_paths = [path for path, _ in test_set.samples]
    if split is not None:
        train_paths, test_paths = [train_paths[i] for i in split[0]], [test_paths[i] for i in split[1]]
    check_images([*train_paths, *test_paths], root)
    if mean is None or std is None:
        computed_mean, computed_std = channel_statistics(train_paths)
        mean, std = mean or computed_mean, std or computed_std
        log.info("data=folder: mean %s, std %s from %d training images (data.mean / data.std to give them)",
                 [round(v, 4) for v in mean], [round(v, 4) for v in std], min(len(train_paths), STATISTICS_IMAGES))
    train_set.transform = imagenet_transform(image_size, train=augment, mean=mean, std=std)
    test_set.transform = imagenet_transform(image_size, train=False, mean=mean, std=std)
    if split is not None:
        if not split[1]:
            raise DataError(f"data.val_fraction={val_fraction} holds out no image of {root}'s classes; raise it")
        train, test = Subset(train_set, split[0]), Subset(test_set, split[1])
    else:
        train, test = train_set, test_set
    return Datasets(train, test, len(train_set.classes), image_size, channels=3,
                    files=file_record(train_paths, test_paths, root, mean, std))
