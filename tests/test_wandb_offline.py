"""W&B in its default offline mode, checked on the files it writes (no network): every attempt of a
run writes its own offline folder under the run's one W&B run id, without wandb's "resume will be
ignored" warning, so that `wandb sync --append` of the folders makes one W&B run; and the group,
job type, tags and config keys that put a sweep's settings side by side."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

import bkn.engine.loop as loop
from bkn.engine.logging import wandb_run_id
from bkn.engine.records import read_summary
from training_helpers import TINY, register_tiny_net, run_train_main, the_run_dir


def offline_records(folder: Path) -> tuple[Any, list[int]]:
    """The run record and the logged history steps of one offline run folder's .wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (data_file,) = folder.glob("*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(data_file))
    run, steps = None, []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "run":
            run = record.run
        elif record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
    return run, steps


def test_a_resumed_offline_run_is_one_w_and_b_run_to_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    run = [*TINY, "train.steps=6", "train.log_every=1", "logger=wandb", f"out_dir={tmp_path}"]
    original_step = loop.optimizer_step

    def stop_after_step_3(session: Any, *args: Any) -> Any:
        if session.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # preempted: checkpoint at the end of step 4
        return original_step(session, *args)

    monkeypatch.setattr(loop, "optimizer_step", stop_after_step_3)
    assert run_train_main(monkeypatch, run) == 143
    monkeypatch.setattr(loop, "optimizer_step", original_step)
    assert run_train_main(monkeypatch, run) == 0  # resumes
    run_dir = the_run_dir(tmp_path)
    assert read_summary(run_dir)["status"] == "finished"
    output = capfd.readouterr()
    assert "`resume` will be ignored" not in output.out + output.err

    # In time order, as the shell's glob gives them to `wandb sync --append`. An attempt that starts in the
    # same second as the one before gets wandb's "-1" suffix (offline-run-<time>-<id>-1), which sorts after.
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = wandb_run_id(run_dir)
    assert len(folders) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", folder.name)
                                     for folder in folders), [folder.name for folder in folders]
    (first, first_steps), (second, second_steps) = (offline_records(folder) for folder in folders)
    assert first.run_id == second.run_id == run_id
    assert first_steps == [1, 2, 3, 4] and second_steps == [5, 6]  # the second continues the first's curves
    for record in (first, second):
        assert (record.run_group, record.job_type) == ("default", "bkn-linear")  # one group per experiment
        assert {"tiny_net", "bkn-linear", "g8_s2", "synthetic"} <= set(record.tags)
        config = {item.key: json.loads(item.value_json) for item in record.config.update}
        assert (config["setting"], config["normalizer_label"], config["data_label"]) == ("g8_s2", "bkn-linear",
                                                                                          "synthetic")
