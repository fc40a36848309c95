"""Print runs side by side from their run records: experiment, data, learning rate, normalizer,
setting, status, accuracy with both inference options, speed, and a column for every other
setting that differs between the runs (read from their config.yaml).

    python scripts/compare_runs.py runs/demo                 # every run of an experiment
    python scripts/compare_runs.py runs/demo/* runs/lrsweep  # run folders, experiment folders, globs

Anything that is not a run (Hydra's multirun.yaml, a .submitit folder) is skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omegaconf import OmegaConf  # noqa: E402
from run_records import Run, load_run  # noqa: E402

from bkn.config import is_under, run_settings  # noqa: E402

COLUMNS = ("run", "experiment", "data", "lr", "normalizer", "setting (g, s)", "steps", "status",
           "top-1 population (B)", "top-1 batch (A)", "examples/s")
# Run-defining settings (bkn.config.run_settings) that the fixed columns already show.
SHOWN = ("data.name", "optim.lr", "normalizer.name", "normalizer.transition", "batch.gradient", "batch.statistics")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (those with a summary.json): each path is one, or an experiment folder of them."""
    found = []
    for path in paths:
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(summary.parent for summary in path.glob("*/summary.json")))
    return list(dict.fromkeys(found))


def settings(run: Run) -> dict[str, Any]:
    """The run's run-defining settings, ``{"optim.momentum": 0.9, ...}``, from its config.yaml."""
    return {key: value for key, value in run_settings(OmegaConf.create(run.config)).items()
            if not is_under(key, SHOWN)}


def differing(runs: list[Run]) -> list[str]:
    """The settings that differ between the runs that have them (a BKN option that BN runs lack
    is no difference: the normalizer column shows it)."""
    all_settings = [settings(run) for run in runs]
    keys = sorted(set().union(*all_settings))
    return [key for key in keys if len({repr(values[key]) for values in all_settings if key in values}) > 1]


def _accuracy(summary: dict[str, Any], inference: str) -> str:
    result = (summary.get("final") or {}).get(inference)
    return "-" if result is None else f"{result['top1']:.2f}%"


def row(run: Run, extra: list[str]) -> tuple[str, ...]:
    summary = run.summary
    normalizer = summary["normalizer"] + (f" ({summary['transition']})" if summary["transition"] else "")
    speed = summary["examples_per_s"]
    lr = (run.config.get("optim") or {}).get("lr")
    values = settings(run)
    return (run.name, run.experiment, str(summary.get("data")), "-" if lr is None else f"{lr:g}", normalizer,
            f"({summary['gradient_batch_size']}, {summary['statistics_batch_size']})",
            f"{summary['step']}/{summary['steps']}", run.verdict, _accuracy(summary, "population"),
            _accuracy(summary, "batch"), "-" if speed is None else f"{speed:.0f}",
            *(str(values.get(key, "-")) for key in extra))


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table, its columns padded to line up in a terminal too."""
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(len(header))]
    lines = [header, tuple("-" * width for width in widths), *rows]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"
                     for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run folders (<out_dir>/<experiment>/<run>), experiment folders (<out_dir>/<experiment>)")
    args = parser.parse_args()
    run_dirs = find_runs(args.paths)
    if not run_dirs:
        parser.error(f"no run records (summary.json) in {', '.join(map(str, args.paths))} or the folders inside: "
                     f"pass run folders or experiment folders, e.g. runs/demo")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    extra = differing(runs)
    print(table((*COLUMNS, *extra), [row(run, extra) for run in runs]))


if __name__ == "__main__":
    main()
