"""The study's run records: the runs of an experiment, from the runs dir and, for those no longer
there, from the committed records (results/study/records/), and the copying of finished runs' records
there, so that the report regenerates on any machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from bkn.engine.checkpoint import checkpoint_path

from run_records import Run, load_local

GAPS_FILE = "variance_gap.json"  # a run's Fig. 8 measurement, kept with its record (the checkpoint is not)
RECORD_FILES = ("summary.json", "config.yaml", "metrics.jsonl", GAPS_FILE)


def load_runs(runs_dir: Path, records_dir: Path, experiment: str) -> list[Run]:
    """The runs of ``experiment`` under ``runs_dir``, and the committed records of those not there, by
    name: the seeds of a cell then come in the same order wherever each lies (tables, dots in figures)."""
    runs = load_local(runs_dir, [experiment])
    names = {run.name for run in runs}
    return sorted(runs + [run for run in load_local(records_dir, [experiment]) if run.name not in names],
                  key=lambda run: run.name)


def save_records(runs: Sequence[Run], records_dir: Path) -> None:
    for run in runs:
        if run.finished and run.directory is not None and run.directory.parent.parent != records_dir:
            target = records_dir / run.experiment / run.directory.name
            target.mkdir(parents=True, exist_ok=True)
            for name in RECORD_FILES:
                if (run.directory / name).exists():
                    shutil.copyfile(run.directory / name, target / name)


def with_checkpoints(runs: Sequence[Run]) -> list[Run]:
    return [run for run in runs if run.directory is not None and checkpoint_path(run.directory).exists()]
