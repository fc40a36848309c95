"""Writers of tiny data sets in the exact on-disk formats bkn reads: CIFAR-10/100 python pickles,
Fashion-MNIST's IDX files and ImageNet-style class folders of real JPEG files. Plain functions, reused by several test files.

Each writer returns what it wrote, so a test can compare what bkn loads against it.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_PIXELS = 3 * 32 * 32


def _write_pickle(path: Path, content: dict) -> None:
    # The real files are Python 2 pickles (protocol 2) whose str keys a Python 3 reader sees as bytes.
    with open(path, "wb") as file:
        pickle.dump(content, file, protocol=2)


def _random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, CIFAR_PIXELS), dtype=np.uint8)


Written = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (images (N, 3, 32, 32) uint8, labels (N,))


def write_cifar10(root: Path, train_per_file: int = 4, test_size: int = 6, seed: int = 0) -> Written:
    """Write ``root/cifar-10-batches-py`` (5 training batches, test batch, meta); returns
    ``{"train": (images (N, 3, 32, 32) uint8, labels (N,)), "test": ...}`` in file order."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    files = [(f"data_batch_{i}", f"training batch {i} of 5", train_per_file, "train") for i in range(1, 6)]
    for name, batch_label, count, split in [*files, ("test_batch", "testing batch 1 of 1", test_size, "test")]:
        data, labels = _random_images(rng, count), rng.integers(0, 10, size=count)
        _write_pickle(directory / name, {
            b"batch_label": batch_label.encode(),
            b"labels": labels.tolist(),
            b"data": data,
            b"filenames": [f"image_{split}_{i}.png".encode() for i in range(count)],
        })
        written[split].append((data, labels))
    _write_pickle(directory / "batches.meta", {
        b"num_cases_per_batch": train_per_file,
        b"label_names": [name.encode() for name in
                         ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")],
        b"num_vis": CIFAR_PIXELS,
    })
    return {split: (np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32), np.concatenate([l for _, l in parts]))
            for split, parts in written.items()}


def write_cifar100(root: Path, train_size: int = 10, test_size: int = 6, seed: int = 0) -> Written:
    """Write ``root/cifar-100-python`` (train, test, meta); returns the same structure as ``write_cifar10``."""
    rng = np.random.default_rng(seed)
    directory = Path(root) / "cifar-100-python"
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", train_size), ("test", test_size)):
        data, fine = _random_images(rng, count), rng.integers(0, 100, size=count)
        _write_pickle(directory / split, {
            b"filenames": [f"image_{split}_{i}.png".encode() for i in range(count)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": data,
        })
        written[split] = (data.reshape(-1, 3, 32, 32), fine)
    _write_pickle(directory / "meta", {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return written


def write_image_folders(
    root: Path,
    classes: tuple[str, ...] = ("n01440764", "n01443537", "n01484850"),
    images_per_class: int = 2,
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> dict[str, list[tuple[Path, int, tuple[int, int, int]]]]:
    """Write ``root/{train,val}/<wnid>/*.JPEG``, each image one solid random colour (JPEG keeps a
    solid colour almost exactly); returns ``{split: [(path, class index, rgb), ...]}``."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[Path, int, tuple[int, int, int]]]] = {"train": [], "val": []}
    for split in written:
        for class_index, wnid in enumerate(sorted(classes)):
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(images_per_class):
                rgb = tuple(int(value) for value in rng.integers(0, 256, size=3))
                path = folder / f"{wnid}_{i}.JPEG"
                Image.new("RGB", size, rgb).save(path, "JPEG", quality=95)
                written[split].append((path, class_index, rgb))
    return written


IDX_UNSIGNED_BYTE = 0x08


def _write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    # The IDX format (yann.lecun.com/exdb/mnist): bytes 0, 0, the type code, the number of
    # dimensions; one big-endian uint32 per dimension; then the data, row-major.
    content = bytes((0, 0, IDX_UNSIGNED_BYTE, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    content += array.astype(np.uint8).tobytes()
    if gzipped:
        Path(f"{path}.gz").write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)


def write_fashion_mnist(root: Path, train_per_class: int = 3, test_size: int = 7, gzipped: bool = True,
                        seed: int = 0) -> Written:
    """Write Fashion-MNIST's four IDX files (``train-images-idx3-ubyte[.gz]``, ...) into ``root``; the
    training split has ``train_per_class`` images of each of the 10 classes, shuffled. Returns
    ``{"train": (images (N, 28, 28) uint8, labels (N,)), "test": ...}`` in file order."""
    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, labels in (("train", "train", rng.permutation(np.repeat(np.arange(10), train_per_class))),
                                  ("test", "t10k", rng.integers(0, 10, size=test_size))):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(Path(root) / f"{prefix}-images-idx3-ubyte", images, gzipped)
        _write_idx(Path(root) / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gzipped)
        written[split] = (images, labels)
    return written


FORMATS = ("PNG", "WEBP", "JPEG", "BMP")


def write_class_folders(root: Path, classes: tuple[str, ...], per_class: int, seed: int = 0) -> dict[Path, np.ndarray]:
    """``root/<class>/<i>.<format>``: random 20x24 RGB images, the formats taking turns; returns the pixels."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image_format = FORMATS[i % len(FORMATS)]
            path = root / name / f"{i}.{image_format.lower()}"
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, image_format, **({"lossless": True} if image_format == "WEBP" else {}))
            written[path] = np.asarray(Image.open(path).convert("RGB"))  # as decoded (JPEG is lossy)
    return written
