"""Fashion-MNIST (data=fashion_mnist) from small IDX files written in the real format, gzipped and
not, in the Debian package's layout and torchvision's; its normalization, subset, augmentation,
download and one-line errors. The real files (the dataset-fashion-mnist package) are needed only
by the test that checks them, skipped without them."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets.mnist import read_image_file, read_label_file

from bkn.data import DataError, build_datasets
from bkn.data import fashion_mnist
from data_writers import write_fashion_mnist


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def expected_images(images, mean: float, std: float) -> torch.Tensor:
    """The pipeline's output without augmentation, computed in float64: (pixel / 255 - mean) / std."""
    return ((torch.from_numpy(images).double().unsqueeze(1) / 255 - mean) / std).float()


def test_the_writer_writes_what_torchvision_reads(tmp_path):
    written = write_fashion_mnist(tmp_path, gzipped=False)
    assert torch.equal(read_image_file(str(tmp_path / "train-images-idx3-ubyte")), torch.from_numpy(written["train"][0]))
    assert torch.equal(read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte")), torch.from_numpy(written["test"][1]))


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("folder", [".", "FashionMNIST/raw"])  # the Debian package's layout, torchvision's
def test_reads_the_idx_files_normalized_by_the_training_set(tmp_path, gzipped, folder):
    written = write_fashion_mnist(tmp_path / folder, gzipped=gzipped)
    data = build_datasets("fashion_mnist", root=str(tmp_path), augment=False)
    assert (data.num_classes, data.image_size, data.channels) == (10, 28, 1)
    train_pixels = torch.from_numpy(written["train"][0]).double() / 255
    mean, std = train_pixels.mean().item(), train_pixels.std().item()
    for split, dataset in (("train", data.train), ("test", data.test)):
        images, labels = stacked(dataset)
        assert torch.equal(labels, torch.from_numpy(written[split][1]).long())
        torch.testing.assert_close(images, expected_images(written[split][0], mean, std))


def test_training_augmentation_is_a_pad_4_shift_and_a_flip(tmp_path):
    written = write_fashion_mnist(tmp_path, train_per_class=1)
    data = build_datasets("fashion_mnist", root=str(tmp_path))
    padded = F.pad(torch.from_numpy(written["train"][0][:1]), (4, 4, 4, 4))
    crops = torch.stack([crop.flip(-1) if flip else crop for top in range(9) for left in range(9)
                         for flip in (False, True) for crop in [padded[:, top:top + 28, left:left + 28]]])
    expected = data.train.transform.transforms[-1](crops.float() / 255)  # the same normalization
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        augmented, _ = data.train[0]
        matches = [i for i, candidate in enumerate(expected) if torch.allclose(augmented, candidate, atol=1e-5)]
        assert matches
        seen.add(matches[0])
    assert len(seen) > 1  # it does move
    assert torch.equal(data.test[0][0], data.test[0][0])  # the test split is not augmented


def test_train_size_keeps_a_stratified_subset_fixed_by_its_own_seed(tmp_path):
    write_fashion_mnist(tmp_path, train_per_class=5)
    full = build_datasets("fashion_mnist", root=str(tmp_path), augment=False)
    subset = build_datasets("fashion_mnist", root=str(tmp_path), augment=False, train_size=30)
    assert torch.bincount(subset.train.labels, minlength=10).tolist() == [3] * 10
    assert len(subset.test) == len(full.test)  # always the whole test split
    # Every kept example is one of the full set's, normalized alike (the whole training set's mean/std).
    full_images, _ = stacked(full.train)
    for image, _ in (subset.train[i] for i in range(len(subset.train))):
        assert any(torch.equal(image, candidate) for candidate in full_images)
    again = build_datasets("fashion_mnist", root=str(tmp_path), augment=False, train_size=30)
    other = build_datasets("fashion_mnist", root=str(tmp_path), augment=False, train_size=30, subset_seed=1)
    assert torch.equal(subset.train.images, again.train.images)
    assert not torch.equal(subset.train.images, other.train.images)


@pytest.mark.parametrize("train_size, match", [(25, "multiple of 10"), (0, "multiple of 10"),
                                               (70, "needs 7 training images of class")])
def test_a_bad_train_size_is_one_line(tmp_path, train_size, match):
    write_fashion_mnist(tmp_path, train_per_class=5)
    with pytest.raises(DataError, match=f"data.train_size={train_size}.*{match}"):
        build_datasets("fashion_mnist", root=str(tmp_path), train_size=train_size)


def test_image_size_resizes_once(tmp_path):
    write_fashion_mnist(tmp_path)
    data = build_datasets("fashion_mnist", root=str(tmp_path), image_size=14)
    assert data.image_size == 14 and data.train[0][0].shape == data.test[0][0].shape == (1, 14, 14)


def test_missing_data_names_the_apt_package_and_the_download_flag(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets("fashion_mnist", root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "train-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


def test_download_goes_through_torchvision_and_its_failure_is_one_line(tmp_path, monkeypatch):
    calls = []

    def fake_downloader(root: str, train: bool, download: bool) -> None:  # torchvision's layout, uncompressed
        calls.append(train)
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw", gzipped=False)

    monkeypatch.setattr(fashion_mnist, "FashionMNIST", fake_downloader)
    assert len(build_datasets("fashion_mnist", root=str(tmp_path), download=True).test) == 7
    assert calls == [True, False]
    build_datasets("fashion_mnist", root=str(tmp_path), download=True)  # present: nothing fetched
    assert calls == [True, False]

    def offline(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://..., got:\n<urlopen error>")

    monkeypatch.setattr(fashion_mnist, "FashionMNIST", offline)
    with pytest.raises(DataError, match=r"^downloading Fashion-MNIST into .* failed: .*dataset-fashion-mnist[^\n]*$"):
        build_datasets("fashion_mnist", root=str(tmp_path / "empty"), download=True)


@pytest.mark.parametrize("damage, match", [
    (lambda data: data[:1000], "corrupt Fashion-MNIST file .*train-images-idx3-ubyte.gz"),  # truncated gzip
    (lambda data: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(data)[4:]), "not an IDX file of 3-D unsigned bytes"),
    (lambda data: gzip.compress(gzip.decompress(data)[:-5]), r"header says \(30, 28, 28\) but it holds"),
])
def test_a_damaged_file_is_named(tmp_path, damage, match):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=match):
        build_datasets("fashion_mnist", root=str(tmp_path))


def test_labels_out_of_range_and_mismatched_counts_are_named(tmp_path):
    write_fashion_mnist(tmp_path, gzipped=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + bytes([12]))
    with pytest.raises(DataError, match=r"labels in .*t10k-labels-idx1-ubyte: 12 is not in 0..9"):
        build_datasets("fashion_mnist", root=str(tmp_path))
    write_fashion_mnist(tmp_path, test_size=5, gzipped=False)
    write_fashion_mnist(tmp_path / "other", test_size=6, gzipped=False)
    (tmp_path / "other" / "t10k-labels-idx1-ubyte").replace(labels)
    with pytest.raises(DataError, match="do not fit"):
        build_datasets("fashion_mnist", root=str(tmp_path))


REAL_FILES = Path(fashion_mnist.DEBIAN_FOLDER)


@pytest.mark.skipif(not (REAL_FILES / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="the dataset-fashion-mnist package is not installed (make data-fashion)")
def test_the_real_files_hold_60000_and_10000_balanced_images():
    data = build_datasets("fashion_mnist", root=str(REAL_FILES), augment=False, train_size=20000)
    assert (len(data.test), data.image_size, data.channels) == (10000, 28, 1)
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10
    assert torch.bincount(data.train.labels).tolist() == [2000] * 10
    images, _ = fashion_mnist.read_split(REAL_FILES / "train-images-idx3-ubyte.gz", REAL_FILES / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 1, 28, 28)
