"""Checkpoints that survive crashes, a full disk and damage, and the SIGTERM / SIGINT / SIGUSR2
flag that asks for one.

Each checkpoint is ``checkpoints/step-<step>.pt``, written to a temporary file in the same folder,
flushed to disk, then moved into place with ``os.replace`` (atomic on POSIX): a crash, a kill or
a full disk mid-write leaves the earlier checkpoints whole. Its SHA-256 is recorded beside it
(``step-<step>.pt.sha256``) before it is moved into place; ``last.pt`` is a hard link to the
newest, and all but the newest ``checkpoint.keep`` are removed once it is in place, so a damaged
newest one (its checksum no longer matches) can be skipped for the one before. Checkpoints hold
only tensors and plain containers and are read with ``torch.load(weights_only=True)``, so loading
one never runs code from the file.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from bkn.engine.disk import NoSpace, no_space_cause, no_space_message

LAST = "last.pt"
CHECKSUM_SUFFIX = ".sha256"
HASH_CHUNK = 1 << 20


def checkpoint_path(run_dir: Path) -> Path:
    """The run's newest checkpoint, under the name that stays the same (a link to ``step-<step>.pt``)."""
    return run_dir / "checkpoints" / LAST


def step_checkpoints(directory: Path) -> list[Path]:
    """The ``step-<step>.pt`` files in ``directory``, newest first."""
    return sorted(directory.glob("step-*.pt"), reverse=True)


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_matches(path: Path) -> bool | None:
    """Whether ``path`` still has the SHA-256 recorded when it was written; None if none was
    recorded (a checkpoint from before checksums, or ``resume=<a file>`` of another kind)."""
    recorded = checksum_path(path)
    if not recorded.exists():
        return None
    return recorded.read_text().split()[0] == file_sha256(path)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def _write_file(directory: Path, name: str, write: Any) -> Path:
    """A temporary file in ``directory`` written by ``write(file)`` and flushed to disk."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def save_checkpoint(path: Path, state: dict[str, Any], keep: int = 1) -> Path:
    """Write ``state`` (holding its ``step``) as ``step-<step>.pt`` in ``path``'s folder with its
    checksum, make ``path`` (``last.pt``) a link to it, and keep the newest ``keep`` checkpoints.
    Returns the file written. A full disk or quota raises ``NoSpace``; the earlier files stay."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    target = directory / f"step-{state['step']:08d}.pt"
    written: list[Path] = []
    try:
        written.append(_write_file(directory, target.name, lambda file: torch.save(state, file)))
        digest = file_sha256(written[0])
        line = f"{digest}  {target.name}\n".encode()
        written.append(_write_file(directory, checksum_path(target).name, lambda file: file.write(line)))
        os.replace(written[1], checksum_path(target))
        os.replace(written[0], target)
        _link_last(directory, target)
    except BaseException as error:
        for temporary in written:
            temporary.unlink(missing_ok=True)
        cause = no_space_cause(error)
        if cause is not None:
            raise NoSpace(no_space_message(directory, _tensor_bytes(state), cause)) from error
        raise
    for old in step_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return target


def _link_last(directory: Path, target: Path) -> None:
    """Make ``last.pt`` in ``directory`` a hard link to ``target``, atomically."""
    link = directory / f".{LAST}.link.tmp"
    link.unlink(missing_ok=True)
    os.link(target, link)
    os.replace(link, directory / LAST)


def drop_checkpoints_after(directory: Path, step: int | None) -> None:
    """Remove the checkpoints of an earlier attempt made after ``step`` (all of them for a run
    started over, ``step`` None), so that resume=auto never picks one of another history."""
    for path in step_checkpoints(directory):
        if step is None or int(path.stem.removeprefix("step-")) > step:
            path.unlink()
            checksum_path(path).unlink(missing_ok=True)
    remaining = step_checkpoints(directory)
    if remaining:
        _link_last(directory, remaining[0])
    elif step is None:  # a last.pt from before step files is kept while its run continues
        (directory / LAST).unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class Interrupted(Exception):
    """A run stopped by SIGTERM / SIGINT / SIGUSR2 after saving its checkpoint; train.py exits with
    128 + the signal's number (130 for Ctrl+C, 143 for SIGTERM, 140 for SIGUSR2), which also stops
    a sweep."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signal_number).name}")
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


class StopRequest:
    """While active, SIGTERM, SIGINT and SIGUSR2 set ``requested`` instead of killing the process, so
    the training loop can checkpoint at the next step boundary and exit cleanly (SLURM preemption,
    ``scancel``, torchrun shutting down its workers, Ctrl+C).

    SIGUSR2 is submitit's signal on SLURM, sent ``signal_delay_s`` before the time limit or by
    ``scancel --signal=USR2``; submitit's own handler requeues the job and exits. It must run only
    after the checkpoint is written, so it is kept and called by :meth:`pass_on`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.requested = False
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_number = number

    @property
    def signal_name(self) -> str | None:
        return None if self.signal_number is None else signal.Signals(self.signal_number).name

    def __enter__(self) -> StopRequest:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def pass_on(self) -> None:
        """After a stop by SIGUSR2, call the handler it had before (under submitit: requeue the job
        and exit, so that it continues from the checkpoint just written)."""
        if self.signal_name != "SIGUSR2":
            return
        handler = self._previous.get(signal.SIGUSR2)
        if callable(handler):
            handler(signal.SIGUSR2, None)
