"""The first line of results/study/README.md, the report's status line: whether the main grid's
large-batch BN baseline converged, how far the Fashion-MNIST grid has run and whether its baseline
reaches 91%, and each part's wall time. The rest of that README is written by hand and kept.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import study
from run_records import Run

from .experiments import GRIDS
from .measures import baseline_top1, final_top1s
from .records import load_runs

README_STATUS_PREFIX = "Status:"
CONVERGED_TOP1 = 97.0  # the main grid's baseline must reach it
FASHION_CONVERGED_TOP1 = 91.0  # and the Fashion-MNIST grid's


def wall_times(runs_dir: Path, records_dir: Path) -> dict[str, float]:
    """Seconds each part's invocations took, added up. study.py logs them in the runs dir; they are
    merged into the committed records/wall_times.jsonl, so a new machine keeps the earlier ones."""
    committed = records_dir / "wall_times.jsonl"
    lines = committed.read_text().splitlines() if committed.exists() else []
    for path in sorted((runs_dir / "logs").glob("*/wall_times.jsonl")):
        lines += [line for line in path.read_text().splitlines() if line.strip() and line not in lines]
    if not lines:
        return {}
    committed.write_text("".join(line + "\n" for line in lines))
    totals: dict[str, float] = defaultdict(float)
    for line in lines:
        entry = json.loads(line)
        totals[entry["part"]] += entry["wall_s"]
    return dict(totals)


def status_line(baseline: float | None) -> str:
    """The README's first line: whether the main grid's BN baseline finished and converged."""
    setting = GRIDS["study"].baseline
    if baseline is None:
        return (f"{README_STATUS_PREFIX} INCOMPLETE — the large-batch BN baseline {setting} has not "
                "finished (make study PART=baseline); nothing here is checked for convergence yet.")
    if baseline < CONVERGED_TOP1:
        return (f"{README_STATUS_PREFIX} NOT CONVERGED — the large-batch BN baseline {setting} reaches "
                f"{baseline:.1f}% top-1 (population statistics), below the {CONVERGED_TOP1:g}% this study requires; "
                "its numbers are not evidence.")
    return (f"{README_STATUS_PREFIX} converged — the large-batch BN baseline {setting} reaches {baseline:.1f}% "
            f"top-1 (population statistics, >= {CONVERGED_TOP1:g}%).")


def fashion_status(runs: Sequence[Run]) -> str:
    """The README status line's part on the Fashion-MNIST grid: how many of its runs have finished,
    and whether its BN baseline reaches the 91% the study requires. Empty before any of its runs."""
    if not runs:
        return ""
    planned = sum(len(study.run_specs(study.PARTS[part], Path("."))) for part in study.FASHION_PARTS)
    setting = GRIDS["study_fashion"].baseline
    finished = sum(run.finished for run in runs)
    baselines = final_top1s([run for run in runs if run.setting == setting and run.variant == "bn"], "population")
    if not baselines:
        verdict = f"its BN baseline {setting} has not finished"
    else:
        mean = statistics.fmean(baselines)
        verdict = (f"its BN baseline {setting} reaches {mean:.1f}% top-1 (population statistics, "
                   f"{len(baselines)} of 3 seeds; {'>=' if mean >= FASHION_CONVERGED_TOP1 else 'below'} the "
                   f"{FASHION_CONVERGED_TOP1:g}% required)")
    return f" Fashion-MNIST: {finished} of {planned} runs finished; {verdict}."


def write_readme_status(out_dir: Path, line: str) -> None:
    readme = out_dir / "README.md"
    rest = readme.read_text().splitlines() if readme.exists() else ["", "# The CPU study", ""]
    if rest and rest[0].startswith(README_STATUS_PREFIX):  # replaced; any other first line is kept
        rest = rest[1:]
    readme.write_text("\n".join([line, *rest]) + "\n")


def readme_status(runs_dir: Path, records_dir: Path) -> str:
    """The status line from the runs of the main and the Fashion-MNIST grid, and the parts' wall times."""
    main_runs = load_runs(runs_dir, records_dir, "study")
    line = status_line(baseline_top1(main_runs, GRIDS["study"].baseline))
    line += fashion_status(load_runs(runs_dir, records_dir, "study_fashion"))
    times = wall_times(runs_dir, records_dir)
    if times:
        line += " Wall time per part (records/wall_times.jsonl): " + ", ".join(f"{part} {seconds / 60:.0f} min"
                                                                   for part, seconds in sorted(times.items())) + "."
    return line
