"""ImageNet (or any data set laid out the same way) from class folders ``root/{train,val}/<wnid>/*``.

The validation images must be sorted into the same class folders as the training images (the
official ``ILSVRC2012_img_val.tar`` is flat; sort it with e.g. the widely used ``valprep.sh``).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from bkn.data.base import DataError, Datasets
from bkn.data.transforms import imagenet_transform

IMAGENET_SIZE = 224
SPLITS = ("train", "val")


def load_rgb(path: str) -> Image.Image:
    """Open one image as RGB; a corrupt or truncated file raises a DataError naming it."""
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports bad data with all three
        raise DataError(f"cannot read image {path}: {error}; replace or delete the file") from None


def check_class_folders(split_dir: Path) -> list[str]:
    """The sorted class folder names of one split; an empty class folder is an error naming it."""
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders in {split_dir}; expected {split_dir}/<class>/<image> "
                        f"(any of {', '.join(IMG_EXTENSIONS)})")
    for name in classes:
        with os.scandir(split_dir / name) as entries:
            if not any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS) for entry in entries):
                raise DataError(
                    f"empty class folder {split_dir / name}: no image with a suffix in {', '.join(IMG_EXTENSIONS)}; "
                    "add its images or remove the folder"
                )
    return classes


def build_imagenet(*, root: str, image_size: int | None, download: bool, augment: bool = True) -> Datasets:
    """ImageNet from class folders with the standard augmentation (see ``imagenet_transform``);
    ``augment=False`` gives the training split the validation transform."""
    if download:
        raise DataError(
            "ImageNet cannot be downloaded automatically (it needs a login at image-net.org); "
            f"put train/ and val/ class folders under data.root={root} and pass data.download=false"
        )
    split_dirs = [Path(root) / split for split in SPLITS]
    missing = [str(path) for path in split_dirs if not path.is_dir()]
    if missing:
        raise DataError(
            f"ImageNet not found: looked for {', '.join(missing)}; put ImageNet's train/ and val/ class "
            f"folders (val/ sorted into class folders) under data.root={root}"
        )
    train_classes, val_classes = (check_class_folders(path) for path in split_dirs)
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise DataError(
            f"the class folders of {split_dirs[0]} and {split_dirs[1]} differ (e.g. {only[:3]}); "
            "both splits need the same classes"
        )
    image_size = image_size or IMAGENET_SIZE
    train = ImageFolder(
        str(split_dirs[0]), transform=imagenet_transform(image_size, train=augment), loader=load_rgb
    )
    test = ImageFolder(str(split_dirs[1]), transform=imagenet_transform(image_size, train=False), loader=load_rgb)
    return Datasets(train, test, len(train.classes), image_size, channels=3)
