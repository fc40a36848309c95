"""Where a run's numbers go: the local run record, the console and, if enabled, Weights & Biases.

Only the main rank logs. W&B is best effort: any failure (not installed, no network, a bad
setting, an init that times out) becomes one warning and training continues with the local
record. Nothing is read from the environment for W&B beyond what wandb itself reads; the config
it receives is redacted like the run record's. On a terminal a progress bar with throughput and
ETA redraws every step; otherwise (logs, SLURM) plain lines ``step k/N ... ETA`` appear every
``train.log_every`` steps. The bkn log lines also go to ``<run dir>/train.log``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from bkn.engine.disk import NoSpace, no_space_cause, no_space_message
from bkn.engine.records import RunRecord, redact

log = logging.getLogger("bkn")


def wandb_run_id(run_dir: Path) -> str:
    """One W&B run id per run directory, the same for every attempt of the run."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


class WandbLogger:
    """A W&B run that never raises: ``run`` is None when W&B is off or failed."""

    def __init__(self, settings: dict[str, Any], *, run_dir: Path, name: str, group: str, job_type: str,
                 tags: list[str], config: dict[str, Any]) -> None:
        self.run: Any = None
        self.directory = run_dir / "wandb"
        # wandb sends its own crash reports to sentry.io; that is not ours to send (nor to wait for offline).
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb

            self.run = wandb.init(
                project=settings["project"], entity=settings["entity"], group=group, job_type=job_type, tags=tags,
                name=name, id=wandb_run_id(run_dir),
                # Online, a resumed run continues its W&B run. Offline, wandb ignores (and warns about)
                # resume: each attempt writes its own offline-run-<time>-<id> folder with that same id,
                # and `wandb sync --append` of the folders, in order, makes them one run.
                resume="allow" if settings["mode"] == "online" else None,
                dir=str(run_dir), mode=settings["mode"], config=redact(config),
                settings=wandb.Settings(init_timeout=settings["init_timeout_s"]),
            )
        except Exception as error:  # W&B never stops training, unless the disk is full (_disable)
            self._disable("init", error)

    def _disable(self, action: str, error: Exception) -> None:
        cause = no_space_cause(error)
        if cause is not None:  # W&B's offline files are part of the run record: a full disk stops the run
            raise NoSpace(no_space_message(self.directory, None, cause)) from error
        log.warning("W&B %s failed (%s: %s); W&B logging is off for this run, training continues with the "
                    "local run record", action, type(error).__name__, error)
        self.run = None

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            try:
                self.run.log(values, step=step)
            except Exception as error:
                self._disable("log", error)

    def finish(self, status: str) -> None:
        if self.run is not None:
            try:
                self.run.summary["status"] = status
                self.run.finish(exit_code=0 if status in ("finished", "preempted") else 1)
            except Exception as error:
                self._disable("finish", error)


class Eta:
    """The time left, from the pace of the steps done in this process so far."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter()

    def at(self, step: int) -> str:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        return _duration(elapsed / done * (self.total_steps - step) if done else 0.0)


class ProgressBar:
    """A one-line bar on a terminal: step, percentage, last loss, examples/s and ETA."""

    def __init__(self, eta: Eta, stream: TextIO) -> None:
        self.total_steps = eta.total_steps
        self.eta = eta  # the run logger's: the bar and the log lines show the same time left
        self.stream = stream
        self.status = ""

    def update(self, step: int) -> None:
        self.stream.write(f"\rstep {step}/{self.total_steps} [{100 * step / self.total_steps:3.0f}%] "
                          f"{self.status} ETA {self.eta.at(step)}\033[K")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class RunLogFile(logging.FileHandler):
    """``train.log``. A line that cannot be written for lack of space is dropped without logging's
    traceback on stderr: the run's next write of its record stops it with one line (``NoSpace``)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if no_space_cause(sys.exc_info()[1]) is None:
            super().handleError(record)


class RunLogger:
    """Sends every train / eval line to the run record, W&B and the console (main rank only)."""

    def __init__(self, record: RunRecord, wandb_logger: WandbLogger | None, *, total_steps: int, start_step: int,
                 enabled: bool, stream: TextIO = sys.stdout) -> None:
        self.record, self.wandb = record, wandb_logger
        self.enabled = enabled
        self.total_steps, self.eta = total_steps, Eta(total_steps, start_step)
        interactive = enabled and stream.isatty()
        self.bar = ProgressBar(self.eta, stream) if interactive else None
        self.file_handler: logging.Handler | None = None
        if enabled:  # the same lines as the console's, kept with the run record
            self.file_handler = RunLogFile(record.log_path)
            self.file_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            log.addHandler(self.file_handler)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step)

    def train(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.record.append({"kind": "train", **line})
        if self.wandb is not None:
            self.wandb.log({f"train/{key}": value for key, value in line.items() if key != "step"}, line["step"])
        loss = "nan" if line["loss"] is None else f"{line['loss']:.4f}"
        text = (f"loss {loss} lr {line['lr']:.4g} {line['examples_per_s']:.0f} ex/s "
                f"skipped {line['skipped_steps']}")
        if self.bar is not None:
            self.bar.status = text
        else:
            log.info("step %d/%d (epoch %.2f): %s ETA %s", line["step"], self.total_steps, line["epoch"], text,
                     self.eta.at(line["step"]))

    def eval(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.record.append({"kind": "eval", **line})
        inference = line["inference"]
        if self.wandb is not None:
            self.wandb.log({f"eval_{inference}/{key}": line[key] for key in ("top1", "top5", "loss")}, line["step"])
        if self.bar is not None:
            self.bar.close()
        log.info("eval at step %d/%d, %s statistics: top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d examples)",
                 line["step"], self.total_steps, inference, line["top1"], line["top5"], line["loss"], line["examples"])

    def checkpoint(self, step: int, path: Path) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            log.info("checkpoint at step %d/%d: %s", step, self.total_steps, path)

    def close(self, status: str, error: str | None = None) -> None:
        """End the run's logging; ``error`` (why it failed, the line train.py prints on the console)
        goes into train.log too."""
        if error is not None and self.file_handler is not None:
            self.file_handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (error,), None))
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish(status)
        if self.file_handler is not None:
            log.removeHandler(self.file_handler)
            self.file_handler.close()
