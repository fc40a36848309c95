"""Faults of the disk a run writes to: an out_dir that cannot be written (found before any data is
read, by writing a probe file) and a disk or quota that fills up while the run writes (one line,
``NoSpace``, instead of the traceback of whichever library was writing).
"""

from __future__ import annotations

import errno
from pathlib import Path

from bkn.config import ConfigError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
PROBE_NAME = ".write-probe"


class NoSpace(Exception):
    """A write of the run failed for lack of space or quota; the message names the folder, the
    bytes needed if known, and the fix. ``train.py`` exits with code 1, the run's status is "failed"."""


def no_space_cause(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error in ``error``'s chain (torch.save reports a full disk as a
    RuntimeError whose context is the OSError), or None."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def no_space_message(folder: Path, needed_bytes: int | None, cause: OSError) -> str:
    needed = ""
    if needed_bytes:
        needed = (f" (about {needed_bytes / 2**20:.1f} MiB needed)" if needed_bytes >= 2**20 else
                  f" (about {max(1, round(needed_bytes / 2**10))} KiB needed)")
    return f"no space left for the run in {folder}{needed}: {cause.strerror}"


def ensure_writable(run_dir: Path, out_dir: str) -> None:
    """Create ``run_dir``, write a probe file in it, and remove both again, before any data is read:
    an out_dir that cannot be written (read-only, no permission, full) is refused with one line.
    Either way the folders made here are removed (the run's lock makes them again)."""
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    probe = run_dir / PROBE_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"bkn")
    except OSError as error:
        raise ConfigError(f"out_dir={out_dir}: cannot write the run folder {run_dir} ({error.strerror}); "
                          f"choose a writable out_dir=... or free space there") from None
    finally:
        probe.unlink(missing_ok=True)
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not made after all, or not empty
                break
