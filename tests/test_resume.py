"""Resuming: a train.py process SIGKILLed in the middle of a run and restarted with resume=auto
ends with exactly the parameters of an uninterrupted run; resume refuses a changed config."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from bkn.config import ConfigError
from bkn.engine.checkpoint import checkpoint_path, load_checkpoint
from bkn.engine.lock import LOCK_NAME
from bkn.engine.records import read_metrics, read_summary
from training_helpers import (TINY, final_state, register_tiny_net, run_fault_runner, run_train_main,
                              the_run_dir, train_in_process)


# 14 steps over epochs of 6 steps (48 examples, 8 per step), checkpoints every 3 steps. The
# Monte-Carlo transition draws noise every step, so the RNG state must be restored too.
RUN = [*TINY, "normalizer=bkn_monte_carlo", "train.steps=14", "checkpoint.every=3", "eval.every=5"]


def test_killed_run_resumes_to_identical_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    reference = train_in_process(tmp_path / "reference", RUN)  # one thread, as the subprocesses

    out_dir = f"out_dir={tmp_path / 'killed'}"
    # SIGKILL during step 8 (0-based; the next epoch started at step 6): last checkpoint at step 6.
    killed = run_fault_runner(tmp_path, [*RUN, out_dir], fault="kill@7")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_dir = tmp_path / "killed" / reference.relative_to(tmp_path / "reference")
    assert load_checkpoint(checkpoint_path(run_dir))["step"] == 6
    assert read_summary(run_dir)["status"] == "running"
    stale = json.loads((run_dir / LOCK_NAME).read_text())  # the killed process's lock record stays behind
    assert stale["host"] == socket.gethostname() and stale["pid"] != os.getpid()

    resumed = run_fault_runner(tmp_path, [*RUN, out_dir])  # resume=auto is the default; the stale lock does not block
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / LOCK_NAME).exists()  # released when the run ended
    assert "resumes from" in resumed.stdout + resumed.stderr  # the start banner

    expected, actual = final_state(reference), final_state(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:  # parameters and running statistics, bit for bit
        assert torch.equal(expected[key], actual[key]), key
    # The record reads as one run: the replayed steps 7-8 are not logged twice, the losses agree.
    ours, theirs = read_metrics(run_dir), read_metrics(reference)
    assert [(line["kind"], line["step"]) for line in ours] == [(line["kind"], line["step"]) for line in theirs]
    assert [line["loss"] for line in ours] == [line["loss"] for line in theirs]
    assert read_summary(run_dir)["status"] == "finished"


def test_resume_auto_refuses_a_run_made_with_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    mine = [*TINY, "train.steps=3", "run_name=mine"]  # one folder whatever the settings
    run_dir = train_in_process(tmp_path, mine)
    (run_dir / "summary.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(ConfigError, match=r"made with optim.lr=0.05, this config has optim.lr=0.2; pass resume=null"):
        train_in_process(tmp_path, [*mine, "optim.lr=0.2"])
    train_in_process(tmp_path, [*mine, "optim.lr=0.2", "resume=null"])  # not finished: starts over
    assert read_summary(run_dir)["status"] == "finished"


def test_resume_null_never_overwrites_a_finished_run_of_other_settings(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    mine = [*TINY, "train.steps=3", "run_name=mine", "resume=null"]
    run_dir = train_in_process(tmp_path, mine)
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=rf"resume=null: {run_dir} holds a finished run made with optim.lr=0.05, "
                                          r"this config has optim.lr=0.2; delete that folder"):
        train_in_process(tmp_path, [*mine, "optim.lr=0.2"])
    other = checkpoint_path(train_in_process(tmp_path / "other", [*TINY, "train.steps=2"]))
    with pytest.raises(ConfigError, match=rf"resume={other}: {run_dir} holds a finished run made with optim.lr"):
        train_in_process(tmp_path, [*mine[:-1], "optim.lr=0.2", f"resume={other}"])  # nor from a checkpoint
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert train_in_process(tmp_path, mine) == run_dir  # the same settings: trained again, as asked


def test_other_settings_get_their_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    first = train_in_process(tmp_path, [*TINY, "train.steps=2"])
    second = train_in_process(tmp_path, [*TINY, "train.steps=2", "optim.lr=0.2"])
    other_data = train_in_process(tmp_path, [*TINY, "train.steps=2", "data.root=elsewhere"])  # unread by synthetic
    assert len({first, second, other_data}) == 3 and first.parent == second.parent == other_data.parent
    assert read_summary(first)["status"] == read_summary(second)["status"] == "finished"
    assert read_summary(other_data)["data_root"] == "elsewhere"
    mine = [*TINY, "train.steps=2", "run_name=mine"]  # one folder whatever the settings: the data is compared
    train_in_process(tmp_path, mine)
    with pytest.raises(ConfigError, match=r"finished run made with data.root=None, this config has data.root=other"):
        train_in_process(tmp_path, [*mine, "data.root=other"])


def test_resume_from_a_checkpoint_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    short = train_in_process(tmp_path / "short", [*TINY, "train.steps=6"])
    continued = train_in_process(tmp_path / "long", [*TINY, "train.steps=8", f"resume={checkpoint_path(short)}"])
    assert read_metrics(continued)[0]["step"] == 8  # steps 1-6 came from the checkpoint
    assert load_checkpoint(checkpoint_path(continued))["step"] == 8


def test_resume_path_of_another_model_or_no_checkpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    bkn = checkpoint_path(train_in_process(tmp_path / "bkn", [*TINY, "normalizer=bkn_analytic", "train.steps=2"]))
    with pytest.raises(ConfigError, match=rf"resume={bkn}: that checkpoint was made with normalizer.name=bkn, this "
                                          r"config has normalizer.name=bn; resume it with the same settings"):
        train_in_process(tmp_path / "bn", [*TINY, "normalizer=bn", f"resume={bkn}"])
    old = load_checkpoint(bkn)
    del old["settings"]  # as written before checkpoints recorded their settings, moved away from its run
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"resume: the checkpoint's model does not fit this config's: \d+ missing"):
        train_in_process(tmp_path / "bn", [*TINY, "normalizer=bkn_linear", f"resume={tmp_path / 'old.pt'}"])
    (tmp_path / "notes.md").write_text("# not a checkpoint\n")
    with pytest.raises(ConfigError, match=r"notes.md is not a bkn checkpoint \(UnpicklingError\); pass a run's"):
        train_in_process(tmp_path / "bn", [*TINY, f"resume={tmp_path / 'notes.md'}"])
    (tmp_path / "x.pt").write_text("hello world\n")  # torch.load fails on this one with KeyError: 101
    assert run_train_main(monkeypatch, [*TINY, f"out_dir={tmp_path / 'bn'}", f"resume={tmp_path / 'x.pt'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: resume={tmp_path / 'x.pt'} is not a bkn checkpoint (KeyError); pass a run's "
                      "checkpoints/last.pt, or resume=null to start over"]
    assert not (tmp_path / "bn").exists()  # refused before anything was written


def _damage(path: Path) -> None:
    """Flip one byte in the middle of ``path`` (a bit rot torch.load may not notice)."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """README's fault table, "a damaged checkpoint": the newest two checkpoints are kept with their
    checksums; resume=auto skips a damaged one with a warning naming it and continues from the one
    before, to the same parameters; a finished run says its final checkpoint is damaged; every
    checkpoint damaged is one line, exit 2."""
    register_tiny_net(monkeypatch)
    run = [*TINY, f"out_dir={tmp_path}"]
    assert run_train_main(monkeypatch, run) == 0
    run_dir = the_run_dir(tmp_path)
    directory = checkpoint_path(run_dir).parent
    assert sorted(path.name for path in directory.iterdir()) == [
        "last.pt", "step-00000003.pt", "step-00000003.pt.sha256", "step-00000006.pt", "step-00000006.pt.sha256"]
    assert checkpoint_path(run_dir).samefile(directory / "step-00000006.pt")
    uninterrupted = final_state(run_dir)
    log = (run_dir / "train.log").read_text()
    _damage(directory / "step-00000006.pt")
    capsys.readouterr()
    assert run_train_main(monkeypatch, run) == 0  # finished: nothing to do, but it says the checkpoint is damaged
    assert f"its final checkpoint {directory / 'step-00000006.pt'} is damaged" in capsys.readouterr().out

    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))  # as if stopped
    assert run_train_main(monkeypatch, run) == 0
    out = capsys.readouterr().out
    assert (f"checkpoint {directory / 'step-00000006.pt'} is damaged (its SHA-256 differs from the one recorded "
            f"when it was written); resuming from the one before it, step-00000003.pt") in out
    assert "at step 3" in out
    assert all(torch.equal(value, uninterrupted[key]) for key, value in final_state(run_dir).items())

    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "preempted"}))
    for name in ("step-00000003.pt", "step-00000006.pt"):
        _damage(directory / name)
    assert run_train_main(monkeypatch, run) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: resume=auto: every checkpoint of {run_dir} is damaged ({directory / 'step-00000006.pt'}, "
        f"{directory / 'step-00000003.pt'}); pass resume=null to start the run over")
    checkpoint_path(run_dir).write_bytes(b"cut short")  # a checkpoint from before checksums: only last.pt
    for name in ("step-00000003.pt", "step-00000006.pt"):
        (directory / name).unlink()
    assert run_train_main(monkeypatch, run) == 2
    assert capsys.readouterr().err.strip() == (f"error: resume=auto: {checkpoint_path(run_dir)} is not a bkn "
                                               "checkpoint (UnpicklingError); pass resume=null to start the run over")
    assert run_train_main(monkeypatch, [*run, "resume=null"]) == 0  # a fresh run starts a fresh train.log
    assert (run_dir / "train.log").read_text().count(" - plan:") == log.count(" - plan:") == 1
