"""Checkpoints that survive crashes, and the SIGTERM / SIGINT / SIGUSR2 flag that asks for one.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then moved over
``last.pt`` with ``os.replace`` (atomic on POSIX): a crash or kill mid-write leaves the previous
``last.pt`` whole. Checkpoints hold only tensors and plain containers and are read with
``torch.load(weights_only=True)``, so loading one never runs code from the file.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import torch

LAST = "last.pt"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / LAST


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
