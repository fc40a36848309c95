"""Fashion-MNIST (Zalando; 60,000 training and 10,000 test images, 28x28 grey, 10 classes) from
its four original IDX files, gzipped or not.

The files are looked for in ``data.root`` itself (the Debian package ``dataset-fashion-mnist``
installs ``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``, the default root) and in
``data.root/FashionMNIST/raw`` (where torchvision's downloader, ``data.download=true``, puts them).
The IDX format is parsed here in a few lines: torchvision's ``read_image_file`` opens only
uncompressed files and checks the header with ``assert``, so it would neither read the Debian
package's files nor name a damaged one; torchvision is used to download.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import FashionMNIST

from bkn.data.base import DataError, Datasets, ImageTensorDataset
from bkn.data.transforms import resize_images, tensor_transform

FASHION_SIZE = 28
NUM_CLASSES = 10
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_FOLDER = "/usr/share/datasets/fashion-mnist"  # where the package puts the four files
FILES = {  # split -> (images, labels), the names of the original files without .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UNSIGNED_BYTE = 0x08  # the IDX type code of uint8 data, the only one Fashion-MNIST uses


def read_idx(path: Path, dimensions: int) -> torch.Tensor:
    """The uint8 array of one IDX file (``.gz`` or not): a magic ``0, 0, 0x08, dimensions``, one
    big-endian int32 per dimension, then the data. A wrong header or size raises a DataError."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:  # a truncated or corrupt gzip stream
        raise DataError(f"corrupt Fashion-MNIST file {path}: {error}; delete it and fetch the data set again") from None
    header = 4 + 4 * dimensions
    if len(data) < header or data[:4] != bytes((0, 0, IDX_UNSIGNED_BYTE, dimensions)):
        raise DataError(f"{path} is not an IDX file of {dimensions}-D unsigned bytes (its header is "
                        f"{data[:4].hex() or 'empty'}); delete it and fetch the data set again")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">i4", count=dimensions, offset=4))
    if len(data) - header != int(np.prod(shape)):
        raise DataError(f"corrupt Fashion-MNIST file {path}: its header says {shape} but it holds "
                        f"{len(data) - header} bytes of data; delete it and fetch the data set again")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy())


def find_file(root: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``root`` or in torchvision's ``root/FashionMNIST/raw``; uncompressed first."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_split(image_file: Path, label_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` of one split's two files."""
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1).long()
    if images.shape[1:] != (FASHION_SIZE, FASHION_SIZE) or len(images) != len(labels):
        raise DataError(f"{image_file} and {label_file} do not fit: {tuple(images.shape)} images of "
                        f"{FASHION_SIZE}x{FASHION_SIZE} expected, with one label each ({len(labels)}); fetch them again")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"corrupt Fashion-MNIST labels in {label_file}: {int(labels.max())} is not in "
                        f"0..{NUM_CLASSES - 1}; fetch the data set again")
    return images.unsqueeze(1), labels


def stratified_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``size / NUM_CLASSES`` examples of every class, drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    per_class = size // NUM_CLASSES
    chosen = []
    for label in range(NUM_CLASSES):
        of_class = (labels == label).nonzero().flatten()
        if len(of_class) < per_class:
            raise DataError(f"data.train_size={size} needs {per_class} training images of class {label}, "
                            f"but there are {len(of_class)}; use a smaller data.train_size")
        chosen.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def build_fashion_mnist(
    *, root: str, image_size: int | None, download: bool, augment: bool = True,
    train_size: int | None = None, subset_seed: int = 0,
) -> Datasets:
    """Fashion-MNIST normalized with the mean and std of all its training images; for training
    (if ``augment``) a random shift by up to 4 pixels (pad 4, crop 28) and a horizontal flip.
    ``train_size`` keeps a stratified random subset of the training images (the same one for every
    run: drawn with ``subset_seed``, not the run's seed); the test split is always all 10,000."""
    if train_size is not None and (train_size < NUM_CLASSES or train_size % NUM_CLASSES):
        raise DataError(f"data.train_size={train_size}; use a positive multiple of {NUM_CLASSES} "
                        "(every class gets the same share) or null for all training images")
    directory = Path(root)
    names = [name for pair in FILES.values() for name in pair]
    if download and any(find_file(directory, name) is None for name in names):
        try:
            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
        except (OSError, RuntimeError) as error:  # no network, a read-only root, a failed checksum
            message = str(error).replace("\n", " ")
            raise DataError(f"downloading Fashion-MNIST into {root} failed: {message}; install the "
                            f"{DEBIAN_PACKAGE} package or put the files there by hand") from None
    found = {name: find_file(directory, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in data.root={root} (no {missing[0]}[.gz]); install the Debian package "
            f"with `apt-get install {DEBIAN_PACKAGE}` (or `make data-fashion`), which fills the default "
            f"data.root={DEBIAN_FOLDER}, or pass data.download=true with a writable data.root (needs internet)"
        )
    train_images, train_labels = read_split(*(found[name] for name in FILES["train"]))
    test_images, test_labels = read_split(*(found[name] for name in FILES["test"]))
    # The normalization is the whole training set's, whatever subset trains: computed at load (~1 s),
    # so it is always that of the files read, and the same for every train_size.
    pixels = train_images.float() / 255
    mean, std = [pixels.mean().item()], [pixels.std().item()]
    if train_size is not None:
        keep = stratified_subset(train_labels, train_size, subset_seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    image_size = image_size or FASHION_SIZE
    train_set = ImageTensorDataset(resize_images(train_images, image_size), train_labels, tensor_transform(
        mean, std, image_size=image_size, augment=augment, flip=True))
    test_set = ImageTensorDataset(resize_images(test_images, image_size), test_labels, tensor_transform(
        mean, std, image_size=image_size, augment=False, flip=True))
    return Datasets(train_set, test_set, NUM_CLASSES, image_size, channels=1)
