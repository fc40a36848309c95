"""Faults of the disk and of the user's files (issue 33), each a row of README's fault table: an
out_dir that cannot be written, a full disk (simulated, and a real tmpfs as root), a corrupt
image of data=folder found before the first step, and an image folder changed under a resumed
run. (A damaged checkpoint: test_resume.py.)"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import bkn.engine.session as session
from bkn.engine.checkpoint import checkpoint_path, checksum_matches, load_checkpoint, step_checkpoints
from bkn.engine.records import read_metrics, read_summary
from data_writers import write_class_folders
from training_helpers import (TINY, TINY_RUN, final_state, register_tiny_net, run_fault_runner, run_train_main,
                              save_then_fail, the_run_dir, train_in_process)

NO_SPACE = "No space left on device"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """``mount(name, options)``: a tmpfs at ``tmp_path / name``, unmounted after the test. Needs root
    (CI runs as root); elsewhere the test skips with that reason."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_an_unwritable_out_dir_is_refused_before_the_data_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  request: pytest.FixtureRequest) -> None:
    """As root a read-only tmpfs (root may write anywhere else); otherwise a folder without write permission."""
    register_tiny_net(monkeypatch)
    if os.geteuid() == 0:
        out_dir, reason = request.getfixturevalue("tmpfs")("ro", "ro,size=1m") / "runs", "Read-only file system"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out_dir, reason = locked / "runs", "Permission denied"

    def no_data(*args: Any) -> None:
        raise AssertionError("the data was read before the out_dir was checked")

    monkeypatch.setattr(session, "load_datasets", no_data)
    assert run_train_main(monkeypatch, [*TINY, f"out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: out_dir={out_dir}: cannot write the run folder {out_dir}/default/tiny_net_")
    assert err.endswith(f"({reason}); choose a writable out_dir=... or free space there") and "\n" not in err
    assert not out_dir.exists()


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint write that fails for lack of space (simulated: torch.save fails with ENOSPC as on
    a full disk) stops the run with one line, exit 1, status failed, the line in summary.json and
    train.log; the checkpoint before and the records up to it stay, and the same command, run
    again once there is space, ends with the parameters of an uninterrupted run."""
    register_tiny_net(monkeypatch)
    uninterrupted = final_state(train_in_process(tmp_path / "reference", TINY))
    run = [*TINY, f"out_dir={tmp_path / 'runs'}"]
    save_then_fail(monkeypatch, OSError(errno.ENOSPC, NO_SPACE))
    assert run_train_main(monkeypatch, run) == 1
    run_dir = the_run_dir(tmp_path / "runs")
    directory = checkpoint_path(run_dir).parent
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: no space left for the run in {directory} (about ")
    assert error.endswith(f" KiB needed): {NO_SPACE}; free space and run the same command again: it continues "
                          f"from {checkpoint_path(run_dir)} (step 3)")
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and f"error: {summary['error']}" == error
    assert (run_dir / "train.log").read_text().rstrip().endswith(f"[bkn][ERROR] - {error}")
    assert [path.name for path in step_checkpoints(directory)] == ["step-00000003.pt"]
    assert checksum_matches(directory / "step-00000003.pt") and load_checkpoint(checkpoint_path(run_dir))["step"] == 3
    assert not list(directory.glob(".*.tmp"))
    assert all(json.dumps(line) for line in read_metrics(run_dir))  # whole lines only

    monkeypatch.undo()  # space is back
    register_tiny_net(monkeypatch)
    assert run_train_main(monkeypatch, run) == 0
    assert read_summary(run_dir)["status"] == "finished" and read_summary(run_dir)["error"] is None
    assert all(torch.equal(value, uninterrupted[key]) for key, value in final_state(run_dir).items())


def test_a_real_full_disk_is_one_line_and_nothing_is_lost(tmp_path: Path, tmpfs: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's reproduction on a tmpfs that holds the first checkpoint but not the second
    (train.py in a subprocess); after a remount with more space the same command finishes."""
    register_tiny_net(monkeypatch)
    reference = train_in_process(tmp_path / "reference", TINY)
    checkpoint_bytes = (checkpoint_path(reference).parent / "step-00000003.pt").stat().st_size
    record_bytes = sum(path.stat().st_size for path in reference.rglob("*") if path.is_file()
                       and path.parent.name != "checkpoints")
    size_kib = (record_bytes + checkpoint_bytes * 3 // 2) // 1024 + 8  # pages of 4 KiB round up each file
    disk = tmpfs("full", f"size={size_kib}k")
    run = [*TINY, f"out_dir={disk / 'runs'}"]
    result = run_fault_runner(tmp_path, run)
    assert result.returncode == 1, result.stderr[-3000:]
    run_dir = the_run_dir(disk / "runs")
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: no space left for the run in {checkpoint_path(run_dir).parent}")
    assert error.endswith(f"it continues from {checkpoint_path(run_dir)} (step 3)")
    assert read_summary(run_dir)["status"] == "failed"
    assert checksum_matches(checkpoint_path(run_dir).parent / "step-00000003.pt")
    subprocess.run(["mount", "-o", f"remount,size={size_kib * 4}k", str(disk)], check=True)
    result = run_fault_runner(tmp_path, run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(run_dir)["status"] == "finished"
    uninterrupted = final_state(reference)
    assert all(torch.equal(value, uninterrupted[key]) for key, value in final_state(run_dir).items())


FOLDER_RUN = [*TINY_RUN, "data=folder", "data.image_size=8", "data.num_workers=0", "batch.gradient=2",
              "train.steps=4", "checkpoint.every=2"]


def test_a_corrupt_test_image_is_named_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every file of both splits is checked at start-up: the unreadable ones in one line (the first
    three by path, and the count), exit 2, nothing trained and no folder made."""
    register_tiny_net(monkeypatch)
    written = sorted(write_class_folders(tmp_path / "images", ("cat", "dress"), per_class=6))
    broken = [path for path in written if path.suffix == ".png"]  # 007.png in the issue: any split
    for path in broken:
        os.truncate(path, 10)
    run = [*FOLDER_RUN, f"data.root={tmp_path / 'images'}", f"out_dir={tmp_path / 'runs'}"]
    assert run_train_main(monkeypatch, run) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: {len(broken)} of {len(written)} images under data.root={tmp_path / 'images'} "
                          f"cannot be read: {broken[0]} (")
    assert f"; {broken[2]} (" in err and f" and {len(broken) - 3} more; replace or delete them" in err
    assert not (tmp_path / "runs").exists()


def test_a_changed_image_folder_is_refused_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The split and the normalization are recorded; a run resumed on a folder with a file
    deleted refuses with one line saying so and how to go on (never evaluating on another split)."""
    register_tiny_net(monkeypatch)
    written = sorted(write_class_folders(tmp_path / "images", ("cat", "dress"), per_class=5))
    run = [*FOLDER_RUN, f"data.root={tmp_path / 'images'}", f"out_dir={tmp_path / 'runs'}"]
    assert run_train_main(monkeypatch, run) == 0
    run_dir = the_run_dir(tmp_path / "runs")
    files = read_summary(run_dir)["data_files"]
    assert (files["train"], files["test"]) == (8, 2) and len(files["mean"]) == len(files["std"]) == 3
    summary = read_summary(run_dir)
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))  # as if stopped
    written[0].unlink()
    capsys.readouterr()
    assert run_train_main(monkeypatch, run) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: data.root={tmp_path / 'images'} changed since the checkpoint at step 4: 1 file(s) "
                   f"removed from the train split (8 -> 7); the split and its mean and std would change under "
                   f"the run. Put the files back to continue it, or pass resume=null to train it again on the "
                   f"folder as it is now")
    assert read_summary(run_dir)["status"] == "preempted"  # the record is untouched
    assert run_train_main(monkeypatch, [*run, "resume=null"]) == 0
    assert read_summary(run_dir)["data_files"]["train"] == 7
