"""One writer per run: the main rank holds ``<run dir>/.lock`` for the run's whole life.

The lock is an exclusive ``flock`` on that file. The kernel drops it when its process ends, however
it ends (SIGKILL, the OOM killer), so a killed run never blocks the next attempt, and a SLURM job
requeued after its process ended takes it at once. On NFS, Linux turns ``flock`` into the server's
POSIX locks, so it holds between hosts; Lustre needs the ``flock`` mount option for that.

The file also records its holder (host, pid, start time, SLURM job): for the message that refuses a
second process, for a requeued SLURM job that finds its earlier attempt's lock not yet freed by NFS
(it waits for it), and as the lock itself on a file system that refuses locks. There a record of a
live process on this host holds the run, one of a process that is gone (or of an earlier attempt
of this SLURM job) does not, and one from another host is refused with a message that says it
cannot be checked from here. The file is removed when the run ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
# A requeued SLURM job may start on another host before NFS frees the lock of its earlier attempt's
# dead host (NFSv4 does when that client's lease runs out, 90 s by default): it waits that long.
EARLIER_ATTEMPT_WAIT_S = 180.0


class RunInUse(Exception):
    """Another process holds the run directory; the message names it and the fix."""


def _holder_record() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


def _read_holder(lock_path: Path) -> dict[str, object] | None:
    try:
        return json.loads(lock_path.read_text())
    except (OSError, ValueError):  # gone, or written only in part
        return None


def _describe(holder: dict[str, object] | None) -> str:
    if holder is None:
        return "another process (it has not recorded itself yet)"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder['pid']} on host {holder['host']}{job} since {holder['since']}"


def _earlier_attempt_of_this_job(holder: dict[str, object] | None) -> bool:
    """SLURM starts a requeued job only after its earlier attempt ended: such a holder is gone."""
    return bool(holder and holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"))


def _may_still_run(holder: dict[str, object]) -> bool:
    """Whether the recorded holder may still run (used where the file system has no locks)."""
    if _earlier_attempt_of_this_job(holder):
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _acquire(lock_path: Path) -> int:
    """A descriptor of ``lock_path`` holding its lock; raises RunInUse if another process holds it."""
    deadline = time.monotonic() + EARLIER_ATTEMPT_WAIT_S
    while True:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = _read_holder(lock_path)
            if _earlier_attempt_of_this_job(holder) and time.monotonic() < deadline:
                time.sleep(1.0)  # its lock is about to be freed
                continue
            raise RunInUse(f"{lock_path.parent} is in use by {_describe(holder)}; one process "
                           f"writes a run: wait until that one ends (or stop it), then run the same command "
                           f"again") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(descriptor)
                raise
            holder = _read_holder(lock_path)  # no locks here: the record decides
            if holder is not None and _may_still_run(holder):
                os.close(descriptor)
                unchecked = "" if holder.get("host") == socket.gethostname() else (
                    " (this file system has no locks and that host cannot be checked from here)")
                raise RunInUse(f"{lock_path.parent} is in use by {_describe(holder)}{unchecked}; wait until that "
                               f"run ends, or if it has ended, delete {lock_path}; then run the same command "
                               f"again") from None
        try:  # a holder that was ending may have removed the file between our open and our lock
            if os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(descriptor)
    os.ftruncate(descriptor, 0)
    os.write(descriptor, json.dumps(_holder_record()).encode())
    os.fsync(descriptor)
    return descriptor


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` (made if missing) for the block's duration; raises RunInUse, having
    changed nothing, when another process holds it. Folders made here and left empty are removed."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    try:
        descriptor = _acquire(lock_path)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # before the lock goes: a waiting process retries on a new file
            os.close(descriptor)
    finally:
        for folder in made:  # deepest first: a run that wrote nothing (e.g. refused data) leaves nothing
            try:
                folder.rmdir()
            except OSError:  # not empty
                break
