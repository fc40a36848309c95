"""One writer per run: a second process on a run that another one holds is refused with one line
and changes nothing; a lock left by a killed process never blocks (tests/test_resume.py kills one);
on a file system without locks the lock file's record decides."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bkn.engine.lock import LOCK_NAME, RunInUse, hold_run_dir
from bkn.engine.records import read_metrics, read_summary
from training_helpers import FAULT_RUNNER, TINY, run_fault_runner, subprocess_env, the_run_dir


def test_a_second_identical_command_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    command = [*TINY, "train.steps=6", "train.log_every=1", f"out_dir={tmp_path / 'runs'}"]
    script = tmp_path / "fault_runner.py"
    script.write_text(FAULT_RUNNER)
    first = subprocess.Popen([sys.executable, str(script), *command], cwd=tmp_path, text=True,
                             env=subprocess_env(BKN_TEST_FAULT="wait@3"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "paused").exists():  # the first one is in its fourth step, holding the run
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        run_dir = the_run_dir(tmp_path / "runs")
        before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
        second = run_fault_runner(tmp_path, command)
        assert second.returncode == 2
        assert second.stderr.strip() == (
            f"error: {run_dir} is in use by pid {first.pid} on host {socket.gethostname()} since "
            f"{json.loads((run_dir / LOCK_NAME).read_text())['since']}; one process writes a run: wait until that one "
            f"ends (or stop it), then run the same command again")
        assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before  # untouched
    finally:
        (tmp_path / "go").touch()
        output, errors = first.communicate(timeout=180)
    assert first.returncode == 0, errors[-3000:]
    assert [line["step"] for line in read_metrics(run_dir) if line["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert read_summary(run_dir)["status"] == "finished"
    assert not (run_dir / LOCK_NAME).exists()


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "default" / "mine"
    with pytest.raises(ValueError, match="refused data"):
        with hold_run_dir(run_dir):
            raise ValueError("refused data")
    assert not (tmp_path / "runs").exists()


@pytest.fixture()
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses locks (as Lustre without its flock mount option does)."""
    def refuse(descriptor: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def _write_holder(run_dir: Path, **holder: object) -> None:
    run_dir.mkdir(parents=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-12-01 10:00:00 UTC", "slurm_job": None}
    (run_dir / LOCK_NAME).write_text(json.dumps({**record, **holder}))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_without_locks_a_record_of_a_live_process_here_holds_the_run(tmp_path: Path, no_locks: None) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_holder(tmp_path / "run", pid=sleeper.pid)
        with pytest.raises(RunInUse, match=rf"in use by pid {sleeper.pid} on host {socket.gethostname()} since "
                                           r"2026-12-01 10:00:00 UTC; wait until that run ends, or if it has ended, "
                                           rf"delete {tmp_path / 'run' / LOCK_NAME}"):
            with hold_run_dir(tmp_path / "run"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_locks_a_record_of_a_process_that_is_gone_does_not(tmp_path: Path, no_locks: None) -> None:
    _write_holder(tmp_path / "run", pid=_dead_pid())
    with hold_run_dir(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_without_locks_another_hosts_record_is_refused_saying_it_cannot_be_checked(
        tmp_path: Path, no_locks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_holder(tmp_path / "run", host="node17", pid=4242, slurm_job="1001")
    with pytest.raises(RunInUse, match=r"pid 4242 on host node17, SLURM job 1001 since 2026-12-01 10:00:00 UTC \(this "
                                       r"file system has no locks and that host cannot be checked from here\)"):
        with hold_run_dir(tmp_path / "run"):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "1001")  # the same job, requeued: its earlier attempt has ended
    with hold_run_dir(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["slurm_job"] == "1001"


def test_a_requeued_slurm_job_waits_for_its_earlier_attempts_lock(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As on NFS, where a dead host's lock is freed only when its lease runs out."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = ("import fcntl, json, os, sys, time\n"
              f"file = open({str(run_dir / LOCK_NAME)!r}, 'w')\n"
              "fcntl.flock(file, fcntl.LOCK_EX)\n"
              "file.write(json.dumps({'host': 'node17', 'pid': 4242, 'since': 'then', 'slurm_job': '1001'}))\n"
              "file.flush()\n"
              "print('held', flush=True)\n"
              "time.sleep(2)\n"
              "print(time.time(), flush=True)\n")  # then exits, which frees the lock
    earlier = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert earlier.stdout.readline() == "held\n"
        monkeypatch.setenv("SLURM_JOB_ID", "1002")  # another job: refused at once
        with pytest.raises(RunInUse, match=r"in use by pid 4242 on host node17, SLURM job 1001 since then"):
            with hold_run_dir(run_dir):
                pass
        monkeypatch.setenv("SLURM_JOB_ID", "1001")  # the same job, requeued: waits for the lock
        with hold_run_dir(run_dir):
            acquired = time.time()
        assert acquired >= float(earlier.stdout.readline())  # after the earlier attempt ended: it waited
    finally:
        earlier.kill()
        earlier.wait()
