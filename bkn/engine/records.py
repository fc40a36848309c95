"""The local run record every run writes (the format is documented in docs/run-records.md):

``<out_dir>/<experiment_name>/<run_name>/config.yaml`` (the resolved config), ``metrics.jsonl`` (one
JSON object per line: train and eval lines), ``summary.json`` (the run's settings, status and final
accuracies, rewritten at every evaluation; a failed run's ``error`` line) and ``checkpoints/``.

Only the main rank writes. A write that fails for lack of space raises ``NoSpace`` and leaves the
file it was writing as it was. Files are strict JSON: a non-finite number is written as ``null``.
Values under keys that look like credentials are replaced before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from bkn.engine.disk import NoSpace, no_space_cause, no_space_message

SECRET_KEY = re.compile(r"api[_-]?key|token|secret|password|credential", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(value: Any) -> Any:
    """A copy of a nested dict/list with every credential-like key's value replaced."""
    if isinstance(value, dict):
        return {key: REDACTED if SECRET_KEY.search(str(key)) else redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def _strict_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def error_line(error: BaseException) -> str:
    """The error's message on one line; for one re-raised from a DataLoader worker (whose message
    is the worker's traceback), the original message, its last line. An error without a message
    is named by its type."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")


def _no_space(path: Path, needed_bytes: int, error: OSError) -> OSError | NoSpace:
    """``NoSpace`` naming ``path``'s folder if ``error`` is a full disk or quota, else ``error``."""
    cause = no_space_cause(error)
    return error if cause is None else NoSpace(no_space_message(path.parent, needed_bytes, cause))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)  # the file it would replace stays as it was
        raise _no_space(path, len(text.encode()), error) from error


class RunRecord:
    """Writer of one run's record; every method is a no-op unless ``writable`` (the main rank)."""

    def __init__(self, run_dir: Path, writable: bool) -> None:
        self.run_dir = run_dir
        self.writable = writable
        self.config_path = run_dir / "config.yaml"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self.log_path = run_dir / "train.log"  # the console's lines (RunLogger)

    def start(self, config: dict[str, Any], resumed_step: int | None) -> None:
        """Write the config; a fresh run (``resumed_step`` None) drops an earlier record's metrics,
        summary and log, a resumed one drops the metrics after its checkpoint's step (they are
        replayed) and appends to the log."""
        if not self.writable:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.config_path, yaml.safe_dump(redact(config), sort_keys=False))
        if resumed_step is None:
            self.metrics_path.unlink(missing_ok=True)
            self.summary_path.unlink(missing_ok=True)
            self.log_path.unlink(missing_ok=True)
        elif self.metrics_path.exists():
            kept = [line for line in read_metrics(self.run_dir) if line["step"] <= resumed_step]
            _write_atomically(self.metrics_path, "".join(json.dumps(line) + "\n" for line in kept))

    def append(self, line: dict[str, Any]) -> None:
        """Append one line; a write that fails (a full disk) leaves the file as it was, no half line."""
        if not self.writable:
            return
        data = (json.dumps(_strict_json(line), allow_nan=False) + "\n").encode()
        with open(self.metrics_path, "ab", buffering=0) as file:  # unbuffered: nothing left to fail at close
            size = os.fstat(file.fileno()).st_size
            try:
                unwritten = memoryview(data)
                while unwritten:
                    unwritten = unwritten[file.write(unwritten):]
            except OSError as error:
                os.ftruncate(file.fileno(), size)
                raise _no_space(self.metrics_path, len(data), error) from error

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.writable:
            _write_atomically(self.summary_path, json.dumps(_strict_json(summary), indent=2, allow_nan=False) + "\n")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CHANCE_FACTOR = 1.5  # a top-1 no better than 1.5 x chance (15% with 10 classes) counts as chance


def learning_verdict(metrics: list[dict[str, Any]], final: dict[str, dict[str, Any]],
                     num_classes: int) -> str | None:
    """Why a finished run did not learn, or ``None`` if it did: its last logged training loss is no
    lower than its first, or its best final top-1 (over the inference options) is at chance."""
    losses = [line["loss"] for line in metrics if line.get("kind") == "train" and line.get("loss") is not None]
    reasons = []
    if len(losses) >= 2 and losses[-1] >= losses[0]:
        reasons.append(f"its training loss did not fall ({losses[0]:.3f} at the first log line, "
                       f"{losses[-1]:.3f} at the last)")
    top1 = [result["top1"] for result in final.values() if result.get("top1") is not None]
    if top1 and max(top1) <= CHANCE_FACTOR * 100 / num_classes:
        reasons.append(f"its final top-1 ({max(top1):.2f}%) is at chance ({100 / num_classes:.1f}% for "
                       f"{num_classes} classes)")
    return " and ".join(reasons) or None
