"""What the study's report measures on a run or a cell of runs (a setting and a normalizer): the
final top-1 under an inference option, the final training loss and whether it has flattened, the
steps until a threshold, the gap between the options; and the grouping of runs into cells.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Sequence

from run_records import Run

from .experiments import Setting
from .normalizers import inference_of, variant_key

OPTIONS = {"B": "population", "A": "batch"}  # the paper's inference options
# Training loss flat: the mean of the last 10% of steps at most 20% (or 0.01) below that of the 10% before.
FLAT_TOLERANCE, FLAT_ABSOLUTE = 0.2, 0.01


def final_loss(run: Run) -> float | None:
    """Mean training loss over the last 10% of the run's logged steps."""
    losses = run.train_losses()
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10):]]
    return statistics.fmean(tail) if tail else None


def loss_is_flat(run: Run) -> bool | None:
    losses = [loss for _, loss in run.train_losses()]
    tenth = len(losses) // 10
    if tenth < 1:
        return None
    last, before = statistics.fmean(losses[-tenth:]), statistics.fmean(losses[-2 * tenth:-tenth])
    return before - last <= max(FLAT_TOLERANCE * before, FLAT_ABSOLUTE)


def rows_of(runs: Sequence[Run]) -> dict[tuple[Setting, str], list[Run]]:
    """The runs by (setting, variant): settings from the largest, normalizers in the table order."""
    rows: dict[tuple[Setting, str], list[Run]] = defaultdict(list)
    for run in runs:
        rows[run.setting, run.variant].append(run)
    return dict(sorted(rows.items(), key=lambda item: ((-item[0][0][0], -item[0][0][1]), variant_key(item[0][1]))))


def baseline_top1(runs: Sequence[Run], setting: Setting) -> float | None:
    """The BN baseline's final top-1 at ``setting`` (population statistics), mean over its finished seeds."""
    values = [top1 for run in runs if run.finished and run.setting == setting and run.variant == "bn"
              and (top1 := run.final("population")) is not None]
    return statistics.fmean(values) if values else None


def final_top1s(runs: Sequence[Run], inference: str) -> list[float]:
    """The final top-1 under ``inference`` of each finished run that recorded one. A per-example
    normalizer (GN) normalizes each example with its own statistics, so its option A is its option B."""
    return [top1 for run in runs if run.finished
            and (top1 := run.final(inference_of(run.variant, inference))) is not None]


def steps_to_reach(runs: Sequence[Run], inference: str, threshold: float) -> list[int | None]:
    """Per finished run, the step of its first evaluation at or above ``threshold`` (None: never)."""
    return [run.first_reach(inference_of(run.variant, inference), threshold)
            for run in runs if run.finished]


def option_gaps(runs: Sequence[Run]) -> list[float]:
    """Per finished run, |top-1 with batch statistics (A) - top-1 with population statistics (B)|."""
    return [abs(batch - population) for run in runs if run.finished
            and (batch := run.final("batch")) is not None and (population := run.final("population")) is not None]


def best_top1(run: Run) -> float | None:
    """The better of the two inference options' final top-1."""
    values = [v for inference in ("population", "batch") if (v := run.final(inference)) is not None]
    return max(values) if values else None
