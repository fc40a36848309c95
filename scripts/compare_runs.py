"""Print runs side by side from their run records: experiment, data (the data set and its folder),
learning rate, normalizer, setting, status, accuracy with both inference options, speed, a column
for every other setting that differs between the runs (read from their config.yaml), and why a
failed run stopped (its error line). Where runs differ only by their seed, a second table gives
each setting's accuracy over its seeds (mean ± sd, n: the finished runs).

    python scripts/compare_runs.py runs                      # every run of every experiment (the out_dir)
    python scripts/compare_runs.py runs/demo                 # every run of an experiment
    python scripts/compare_runs.py runs/demo/* runs/lrsweep  # run folders, experiment folders, globs

Anything that is not a run (Hydra's multirun.yaml, a .submitit folder) is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from omegaconf import OmegaConf  # noqa: E402
from run_records import Run, load_run  # noqa: E402

from bkn.config import is_under, run_settings  # noqa: E402

COLUMNS = ("run", "experiment", "data", "lr", "normalizer", "setting (g, s)", "steps", "status",
           "top-1 population (B)", "top-1 batch (A)", "examples/s")
ERROR = "error"  # the column of why a run failed (summary.json's error line), shown when one did
# Run-defining settings (bkn.config.run_settings) that the fixed columns already show.
SHOWN = ("data.name", "data.root", "optim.lr", "normalizer.name", "normalizer.transition", "batch.gradient", "batch.statistics")


SEEDS_COLUMNS = ("experiment", "data", "lr", "normalizer", "setting (g, s)", "runs",
                 "top-1 population (B)", "top-1 batch (A)")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (those with a summary.json): each path is one, an experiment folder of them, or
    the out_dir that holds experiment folders."""
    found = []
    for path in paths:
        if (path / "summary.json").is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(summary.parent for summary in path.glob("*/summary.json"))
            found.extend(inside or sorted(summary.parent for summary in path.glob("*/*/summary.json")))
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


def _fixed(run: Run) -> tuple[str, ...]:
    """The experiment, data, lr, normalizer and setting cells of a run's row."""
    summary = run.summary
    normalizer = summary["normalizer"] + (f" ({summary['transition']})" if summary["transition"] else "")
    lr = (run.config.get("optim") or {}).get("lr")
    return (run.experiment, run.data, "-" if lr is None else f"{lr:g}", normalizer,
            f"({summary['gradient_batch_size']}, {summary['statistics_batch_size']})")


def row(run: Run, extra: list[str]) -> tuple[str, ...]:
    summary = run.summary
    speed = summary["examples_per_s"]
    values = {**settings(run), ERROR: summary.get("error") or "-"}
    return (run.name, *_fixed(run), f"{summary['step']}/{summary['steps']}", run.verdict,
            _accuracy(summary, "population"), _accuracy(summary, "batch"), "-" if speed is None else f"{speed:.0f}",
            *(str(values.get(key, "-")) for key in extra))


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}% (n={len(values)})"


def seed_rows(runs: list[Run], extra: list[str]) -> list[tuple[str, ...]]:
    """One row per setting (every column but the seed alike) that has several seeds: the mean ±
    sd of the finished runs' top-1 and n; the runs column counts them all (e.g. "3 (1 diverged)")."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        values = settings(run)
        key = (*_fixed(run), *(str(values.get(name, "-")) for name in extra))
        groups.setdefault(key, []).append(run)
    rows = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        finished = [run for run in members if run.finished]
        others = Counter(run.status for run in members if not run.finished)
        counted = f" ({', '.join(f'{n} {status}' for status, n in sorted(others.items()))})" if others else ""
        accuracies = [_mean_sd([value for run in finished if (value := run.final(inference)) is not None])
                      for inference in ("population", "batch")]
        rows.append((*key, f"{len(members)}{counted}", *accuracies))
    return rows


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table, its columns padded to line up in a terminal too."""
    widths = [max(len(cells[i]) for cells in (header, *rows)) for i in range(len(header))]
    lines = [header, tuple("-" * width for width in widths), *rows]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"
                     for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run folders (<out_dir>/<experiment>/<run>), experiment folders (<out_dir>/<experiment>) "
                             "or an out_dir")
    args = parser.parse_args()
    run_dirs = find_runs(args.paths)
    if not run_dirs:
        parser.error(f"no run records (summary.json) in {', '.join(map(str, args.paths))} or the folders inside: "
                     f"pass run folders, experiment folders or the out_dir, e.g. runs/demo")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    extra = differing(runs)
    errors = [ERROR] if any(run.summary.get("error") for run in runs) else []
    print(table((*COLUMNS, *extra, *errors), [row(run, [*extra, *errors]) for run in runs]))
    shared = [key for key in extra if key != "seed"]
    over_seeds = seed_rows(runs, shared)
    if over_seeds:
        print("\nOver seeds (the settings with several; mean ± sd of the finished runs):\n")
        print(table((*SEEDS_COLUMNS[:5], *shared, *SEEDS_COLUMNS[5:]), over_seeds))


if __name__ == "__main__":
    main()
