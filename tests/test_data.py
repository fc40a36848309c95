"""The data layer: CIFAR pickles and ImageNet folders written in their real formats, digits,
synthetic data, the one-line errors, and the loaders' (seed, epoch) order, resume and sharding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bkn.data import DataError, ImageTensorDataset, build_datasets, build_loader, measure_loader_throughput, set_epoch
from bkn.data.cifar import CIFAR_LAYOUTS
from bkn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from data_writers import write_cifar10, write_cifar100, write_image_folders


def normalized(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The expected output of the CIFAR pipeline without augmentation, computed directly."""
    scaled = torch.from_numpy(images).double() / 255
    return ((scaled - torch.tensor(mean).double().view(3, 1, 1)) / torch.tensor(std).double().view(3, 1, 1)).float()


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


# --- CIFAR -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, writer, num_classes", [("cifar10", write_cifar10, 10), ("cifar100", write_cifar100, 100)]
)
def test_cifar_reads_the_real_pickle_format(tmp_path, name, writer, num_classes):
    written = writer(tmp_path)
    data = build_datasets(name, root=str(tmp_path), augment=False)
    assert (data.num_classes, data.image_size, data.channels) == (num_classes, 32, 3)
    layout = CIFAR_LAYOUTS[name]
    for split, dataset in (("train", data.train), ("test", data.test)):
        images, labels = stacked(dataset)
        assert torch.equal(labels, torch.from_numpy(written[split][1]))
        torch.testing.assert_close(images, normalized(written[split][0], layout.mean, layout.std))


def test_cifar_training_augmentation_is_a_padded_shift_and_optional_flip(tmp_path):
    written = write_cifar10(tmp_path, train_per_file=2)
    data = build_datasets("cifar10", root=str(tmp_path))
    original = torch.from_numpy(written["train"][0][0])
    padded = F.pad(original, (4, 4, 4, 4))
    layout = CIFAR_LAYOUTS["cifar10"]
    candidates = [
        crop.flip(-1) if flip else crop
        for top in range(9) for left in range(9) for flip in (False, True)
        for crop in [padded[:, top : top + 32, left : left + 32]]
    ]
    expected = normalized(torch.stack(candidates).numpy(), layout.mean, layout.std)
    torch.manual_seed(0)
    for _ in range(5):
        augmented, _ = data.train[0]
        assert any(torch.allclose(augmented, candidate, atol=1e-5) for candidate in expected)
    torch.testing.assert_close(data.test[0][0], normalized(written["test"][0][:1], layout.mean, layout.std)[0])


def test_cifar_image_size_resizes_once(tmp_path):
    write_cifar100(tmp_path)
    data = build_datasets("cifar100", root=str(tmp_path), image_size=16)
    assert data.image_size == 16 and data.train[0][0].shape == (3, 16, 16) and data.test[0][0].shape == (3, 16, 16)


def test_missing_cifar_names_the_paths_and_the_fix(tmp_path):
    looked_for = r"CIFAR-10 not found: looked for .*cifar-10-batches-py/data_batch_1.*data\.download=true"
    with pytest.raises(DataError, match=looked_for):
        build_datasets("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match=r"CIFAR-100 not found: looked for .*cifar-100-python/train"):
        build_datasets("cifar100", root=str(tmp_path / "nowhere"))


def test_truncated_cifar_pickle_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    damaged = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"corrupt CIFAR file .*data_batch_3"):
        build_datasets("cifar10", root=str(tmp_path))


def test_cifar_pickle_without_labels_names_the_file(tmp_path):
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as file:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, file, protocol=2)
    with pytest.raises(DataError, match=r"corrupt CIFAR file .*cifar-100-python/test.*fine_labels"):
        build_datasets("cifar100", root=str(tmp_path))


# --- ImageNet-style folders ----------------------------------------------------------------------

def test_image_folders_load_with_the_standard_transforms(tmp_path):
    written = write_image_folders(tmp_path, images_per_class=2)
    data = build_datasets("imagenet", root=str(tmp_path), image_size=24)
    assert (data.num_classes, data.image_size, data.channels) == (3, 24, 3)
    assert len(data.train) == len(data.test) == 6
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for dataset, split in ((data.train, "train"), (data.test, "val")):
        for index, (path, class_index, rgb) in enumerate(written[split]):
            image, label = dataset[index]
            assert label == class_index and image.shape == (3, 24, 24)
            # A solid colour stays solid under any crop, resize and flip; JPEG moves it by a few levels.
            expected = (torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
            assert (image - expected).abs().max() < 4 / 255 / min(IMAGENET_STD)


def test_missing_imagenet_names_both_splits(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=r"ImageNet not found: looked for .*/val;"):
        build_datasets("imagenet", root=str(tmp_path))


def test_corrupt_jpeg_is_named_when_read(tmp_path):
    written = write_image_folders(tmp_path)
    path, _, _ = written["train"][1]
    path.write_bytes(path.read_bytes()[:300])
    data = build_datasets("imagenet", root=str(tmp_path), image_size=16)
    data.train[0]  # the intact images still load
    with pytest.raises(DataError, match=f"cannot read image {path}"):
        data.train[1]


def test_empty_class_folder_is_named_at_construction(tmp_path):
    write_image_folders(tmp_path)
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match=r"empty class folder .*train/n09999999"):
        build_datasets("imagenet", root=str(tmp_path))


def test_imagenet_cannot_be_downloaded(tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded automatically"):
        build_datasets("imagenet", root=str(tmp_path), download=True)


# --- digits and synthetic ------------------------------------------------------------------------

def test_digits_split_is_stratified_deterministic_and_normalized():
    data = build_datasets("digits", augment=False)
    assert (len(data.train), len(data.test), data.num_classes, data.image_size, data.channels) == (1437, 360, 10, 8, 1)
    train_images, train_labels = stacked(data.train)
    test_images, test_labels = stacked(data.test)
    assert train_images.shape == (1437, 1, 8, 8)
    all_counts = np.bincount(load_digits().target)
    assert np.array_equal(np.bincount(train_labels.numpy()) + np.bincount(test_labels.numpy()), all_counts)
    assert np.abs(np.bincount(test_labels.numpy()) - all_counts * 360 / 1797).max() <= 1  # stratified
    torch.testing.assert_close(train_images.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_images.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    again_images, again_labels = stacked(build_datasets("digits", augment=False).test)
    assert torch.equal(again_images, test_images) and torch.equal(again_labels, test_labels)


def test_digits_upscale_and_augmentation_keep_shapes():
    data = build_datasets("digits", image_size=16)
    assert data.image_size == 16 and data.train[0][0].shape == (1, 16, 16) and data.test[0][0].shape == (1, 16, 16)


def test_synthetic_is_deterministic_and_learnable():
    options = dict(image_size=12, num_classes=4, channels=2, train_size=80, test_size=40)
    data = build_datasets("synthetic", **options)
    assert (data.num_classes, data.image_size, data.channels) == (4, 12, 2)
    train_images, train_labels = stacked(data.train)
    test_images, test_labels = stacked(data.test)
    assert train_images.shape == (80, 2, 12, 12) and torch.equal(train_labels, torch.arange(80) % 4)
    assert torch.equal(stacked(build_datasets("synthetic", **options).test)[0], test_images)
    assert not torch.equal(stacked(build_datasets("synthetic", seed=1, **options).test)[0], test_images)
    assert not torch.equal(train_images[:40], test_images)
    # Class structure: the nearest training class mean classifies most test images correctly.
    class_means = torch.stack([train_images[train_labels == k].mean(0) for k in range(4)]).flatten(1)
    predictions = torch.cdist(test_images.flatten(1), class_means).argmin(1)
    assert (predictions == test_labels).float().mean() > 0.9


# --- configuration errors ------------------------------------------------------------------------

def test_unknown_name_lists_the_choices():
    choices = r"unknown data set 'mnist'; choose data=\.\.\. from cifar10, cifar100, imagenet, digits, fashion_mnist, synthetic"
    with pytest.raises(DataError, match=choices):
        build_datasets("mnist")


def test_unknown_option_is_named():
    with pytest.raises(DataError, match=r"data\.num_clases for data set 'synthetic'"):
        build_datasets("synthetic", num_clases=3)


# --- loaders -------------------------------------------------------------------------------------

def index_dataset(size: int) -> ImageTensorDataset:
    """Each example's label is its index, so a batch's labels are the sampled indices."""
    return ImageTensorDataset(torch.zeros(size, 1, 1, 1), torch.arange(size))


def epoch_order(loader, epoch: int, skip_batches: int = 0) -> list[int]:
    set_epoch(loader, epoch, skip_batches)
    return [index for _, labels in loader for index in labels.tolist()]


def test_training_order_is_a_function_of_seed_and_epoch():
    dataset = index_dataset(50)
    first, second = (build_loader(dataset, 8, train=True, seed=3) for _ in range(2))
    assert epoch_order(first, 0) == epoch_order(second, 0)
    assert epoch_order(first, 1) == epoch_order(second, 1) != epoch_order(first, 0)
    assert epoch_order(build_loader(dataset, 8, train=True, seed=4), 0) != epoch_order(first, 0)
    order = epoch_order(first, 2)
    assert len(order) == 48 and len(set(order)) == 48  # full batches only, no repeats


def test_resume_mid_epoch_sees_the_remaining_batches():
    loader = build_loader(index_dataset(50), 8, train=True, seed=1)
    uninterrupted = epoch_order(loader, 5)
    assert epoch_order(loader, 5, skip_batches=2) == uninterrupted[16:]
    assert len(loader) == 4
    assert epoch_order(loader, 5) == uninterrupted  # the skip lasts one epoch
    with pytest.raises(ValueError, match="skip_batches=7"):
        set_epoch(loader, 5, skip_batches=7)


def test_evaluation_loader_keeps_order_and_every_example():
    loader = build_loader(index_dataset(50), 8, train=False)
    assert epoch_order(loader, 0) == list(range(50)) == epoch_order(loader, 1)


def test_distributed_shards_partition_the_data():
    dataset = index_dataset(50)
    shards = [epoch_order(build_loader(dataset, 4, train=True, world_size=2, rank=rank, seed=7), 1) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 24 and not set(shards[0]) & set(shards[1])
    changed = [epoch_order(build_loader(dataset, 4, train=True, world_size=2, rank=rank, seed=7), 2) for rank in (0, 1)]
    assert changed[0] != shards[0]
    evaluation = [epoch_order(build_loader(dataset, 4, train=False, world_size=2, rank=rank), 0) for rank in (0, 1)]
    assert set(evaluation[0]) | set(evaluation[1]) == set(range(50)) and not set(evaluation[0]) & set(evaluation[1])


def test_loader_rejects_a_data_set_without_a_full_batch():
    with pytest.raises(ValueError, match="no full batch of 16"):
        build_loader(index_dataset(20), 16, train=True, world_size=2, rank=0)


def test_loader_throughput_counts_examples():
    loader = build_loader(index_dataset(40), 8, train=True)
    assert measure_loader_throughput(loader, 3) > 0
    with pytest.raises(ValueError, match="batches=5"):
        measure_loader_throughput(loader, 5)


def test_worker_augmentation_seeds_differ_per_rank_and_repeat_per_seed():
    data = build_datasets("synthetic", train_size=32, test_size=8).train
    seed_of = lambda rank, seed=0: build_loader(data, 4, train=True, world_size=2, rank=rank,  # noqa: E731
                                                seed=seed).generator.initial_seed()
    assert seed_of(0) != seed_of(1)
    assert seed_of(0) == seed_of(0) and seed_of(0) != seed_of(0, seed=1)
