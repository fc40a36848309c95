"""data=folder: your own class folders (train/ and val/, or one folder split by a seeded fraction),
in any format torchvision reads, with the data set's own mean and std and name in the records;
and DataLoader workers bounded by the CPUs for every data set."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bkn.engine.session as session
from bkn.data import DataError, build_datasets
from bkn.engine.records import read_summary
from data_writers import write_class_folders
from training_helpers import ROOT, TINY_RUN, register_tiny_net, run_train_main, subprocess_env, train_in_process

def test_one_folder_is_split_per_class_by_a_seeded_fraction(tmp_path: Path) -> None:
    written = write_class_folders(tmp_path, ("cat", "dog", "fox"), per_class=8)
    datasets = build_datasets("folder", root=str(tmp_path), image_size=16, val_fraction=0.25)
    assert datasets.num_classes == 3 and datasets.channels == 3 and datasets.image_size == 16
    train, test = datasets.train, datasets.test
    assert len(train) == 18 and len(test) == 6
    assert sorted(train.indices + test.indices) == list(range(24))  # disjoint, every image once
    test_labels = [train.dataset.targets[index] for index in test.indices]
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]  # 2 of each class's 8
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label in (0, 1, 2)
    again = build_datasets("folder", root=str(tmp_path), image_size=16, val_fraction=0.25)
    other = build_datasets("folder", root=str(tmp_path), image_size=16, val_fraction=0.25, split_seed=1)
    assert again.test.indices == test.indices != other.test.indices
    assert len(written) == 24 and {path.suffix for path in written} == {".png", ".webp", ".jpeg", ".bmp"}


def test_mean_and_std_come_from_the_training_images_or_are_given(tmp_path: Path) -> None:
    written = {}
    for split, seed in (("train", 0), ("val", 1)):
        written[split] = write_class_folders(tmp_path / split, ("a", "b"), per_class=4, seed=seed)
    datasets = build_datasets("folder", root=str(tmp_path), image_size=8, augment=False)
    pixels = np.concatenate([image.reshape(-1, 3) for image in written["train"].values()]) / 255
    normalize = datasets.test.transform.transforms[-1]  # the last step of the test pipeline
    assert np.allclose(normalize.mean, pixels.mean(axis=0), atol=1e-6)
    assert np.allclose(normalize.std, pixels.std(axis=0), atol=1e-6)
    given = build_datasets("folder", root=str(tmp_path), image_size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert given.train.transform.transforms[-1].mean == [0.5, 0.5, 0.5]
    with pytest.raises(DataError, match=r"data.std=\[0.2, 0.0, 0.2\]: expected three numbers .* all positive"):
        build_datasets("folder", root=str(tmp_path), image_size=8, std=[0.2, 0.0, 0.2])


def test_a_missing_split_or_class_is_one_line(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "train", ("a", "b"), per_class=2)
    with pytest.raises(DataError, match=rf"{tmp_path / 'train'} is there but {tmp_path / 'val'} is not; add val/"):
        build_datasets("folder", root=str(tmp_path), image_size=8)
    write_class_folders(tmp_path / "val", ("a", "c"), per_class=2)
    with pytest.raises(DataError, match=r"class folders of .* differ \(e.g. \['b', 'c'\]\)"):
        build_datasets("folder", root=str(tmp_path), image_size=8)


def test_a_run_on_your_folder_is_named_as_such_and_each_folder_is_its_own_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    register_tiny_net(monkeypatch)
    write_class_folders(tmp_path / "three", ("cat", "dog", "fox"), per_class=6)
    write_class_folders(tmp_path / "five", ("a", "b", "c", "d", "e"), per_class=4)
    run = [*TINY_RUN, "data=folder", "data.image_size=8", "train.steps=2", "batch.eval=4", "data.val_fraction=0.25"]
    monkeypatch.setattr(session, "usable_cpus", lambda: 1)  # data.num_workers=4 > 1 CPU: one worker
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        three = train_in_process(tmp_path / "runs", [*run, f"data.root={tmp_path / 'three'}"])
    assert not [warning for warning in caught if "worker" in str(warning.message)]
    with caplog.at_level(logging.INFO, logger="bkn"):
        five = train_in_process(tmp_path / "runs", [*run, f"data.root={tmp_path / 'five'}"])
    assert three != five  # the second data set is another run, not "already finished"
    for run_dir, root in ((three, "three"), (five, "five")):
        summary = read_summary(run_dir)
        assert (summary["status"], summary["data"], summary["data_root"]) == ("finished", "folder", str(tmp_path / root))
    assert "images          8 x 8, 5 classes" in caplog.text  # the plan says how many classes were found
    compare = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(three.parent)],
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    data_column = sorted(line.split("|")[3].strip() for line in compare.stdout.splitlines()[2:])
    assert data_column == [f"folder ({tmp_path / 'five'})", f"folder ({tmp_path / 'three'})"], compare.stderr
    assert run_train_main(monkeypatch, [*run, "data.root=null", f"out_dir={tmp_path / 'none'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: data=folder needs data.root=<the folder that holds your class folders> (docs/data.md)"]


def test_data_workers_are_at_most_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    monkeypatch.setattr(session, "usable_cpus", lambda: 2)
    assert session.data_workers(OmegaConf.create({"data": {"num_workers": 8}})) == 2
    assert session.data_workers(OmegaConf.create({"data": {"num_workers": 1}})) == 1


def test_the_documented_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """docs/data.md's command, on a pets/ folder of both documented layouts (a dry run: it loads the data)."""
    (command,) = [line for line in (ROOT / "docs" / "data.md").read_text().splitlines()
                  if line.startswith("python train.py data=folder")]
    for layout in ("split", "one"):
        pets = tmp_path / layout / "pets"
        if layout == "split":
            for split in ("train", "val"):
                write_class_folders(pets / split, ("cat", "dog"), per_class=20)
        else:
            write_class_folders(pets, ("cat", "dog", "fox"), per_class=10)
        overrides = [word.replace("/data/pets", str(pets)) for word in command.split()[2:]]
        assert run_train_main(monkeypatch, [*overrides, "dry_run=true", f"out_dir={tmp_path / 'runs'}"]) == 0
        plan = capsys.readouterr().out
        assert f"64 x 64, {2 if layout == 'split' else 3} classes" in plan
        assert f"of {40 if layout == 'split' else 24} training examples" in plan
    assert not (tmp_path / "runs").exists()
