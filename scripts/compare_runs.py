"""Print runs side by side from their run records (summary.json): accuracy with both inference
options, setting, status and speed.

    python scripts/compare_runs.py runs/demo/*
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bkn.engine.records import read_summary

COLUMNS = ("run", "normalizer", "setting (g, s)", "steps", "status", "top-1 population (B)", "top-1 batch (A)",
           "examples/s")


def _accuracy(summary: dict[str, Any], inference: str) -> str:
    result = summary["final"].get(inference)
    return "-" if result is None else f"{result['top1']:.2f}%"


def row(summary: dict[str, Any]) -> tuple[str, ...]:
    normalizer = summary["normalizer"] + (f" ({summary['transition']})" if summary["transition"] else "")
    speed = summary["examples_per_s"]
    return (summary["run"], normalizer, f"({summary['gradient_batch_size']}, {summary['statistics_batch_size']})",
            f"{summary['step']}/{summary['steps']}", summary["status"], _accuracy(summary, "population"),
            _accuracy(summary, "batch"), "-" if speed is None else f"{speed:.0f}")


def table(rows: list[tuple[str, ...]]) -> str:
    """A Markdown table, its columns padded to line up in a terminal too."""
    widths = [max(len(cells[i]) for cells in (COLUMNS, *rows)) for i in range(len(COLUMNS))]
    lines = [COLUMNS, tuple("-" * width for width in widths), *rows]
    return "\n".join("| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"
                     for cells in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (<out_dir>/<experiment>/<run>)")
    args = parser.parse_args()
    summaries = [read_summary(run_dir) for run_dir in args.run_dirs]
    missing = [str(run_dir) for run_dir, summary in zip(args.run_dirs, summaries) if summary is None]
    if missing:
        parser.error(f"no summary.json in {', '.join(missing)}: not a run directory, or the run has not started")
    print(table([row(summary) for summary in summaries]))


if __name__ == "__main__":
    main()
