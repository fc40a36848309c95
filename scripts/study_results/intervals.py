"""The interval statistics every table and verdict of the study's report uses, in one place: a
cell's mean ± std, the 95% confidence interval of its mean (Student's t), and the verdict of one
side against another, which is decided only where those intervals do not overlap.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from scipy.stats import t as student_t

BETTER, WORSE, LEVEL, UNDECIDED = "better", "worse", "level", "undecided"


def mean_std(values: Sequence[float], digits: int) -> str:
    if not values:
        return "—"
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean of ``values`` (Student's t with n - 1 degrees of
    freedom), or None for fewer than two values."""
    if len(values) < 2:
        return None
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def interval_text(values: Sequence[float], digits: int) -> str:
    bounds = interval(values)
    return "—" if bounds is None else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def value_text(values: Sequence[float | None], digits: int) -> str:
    """The mean of the values present with its 95% interval, and how many are present where some are not."""
    present = [value for value in values if value is not None]
    text = "—" if not present else f"{statistics.fmean(present):.{digits}f}"
    if len(present) > 1:
        text += f" {interval_text(present, digits)}"
    return text + (f" ({len(present)}/{len(values)})" if len(present) < len(values) else "")


def verdict(ours: Sequence[float], theirs: Sequence[float], higher_is_better: bool = True) -> str:
    """BETTER or WORSE where the 95% intervals of the two means do not overlap, LEVEL where they do
    (the difference lies inside the seeds' spread), UNDECIDED where a side has fewer than two values."""
    ours_bounds, theirs_bounds = interval(ours), interval(theirs)
    if ours_bounds is None or theirs_bounds is None:
        return UNDECIDED
    if ours_bounds[0] > theirs_bounds[1]:
        return BETTER if higher_is_better else WORSE
    if ours_bounds[1] < theirs_bounds[0]:
        return WORSE if higher_is_better else BETTER
    return LEVEL


def speed_verdict(ours: Sequence[int | None], theirs: Sequence[int | None]) -> str:
    """Fewer steps to the threshold is better (None: a seed that never reached it). Both sides reach it
    on every seed: ``verdict`` on the steps; one side on every seed and the other on none: BETTER or
    WORSE; any other mix, or fewer than two seeds a side: UNDECIDED."""
    if min(len(ours), len(theirs)) < 2:
        return UNDECIDED
    ours_all, theirs_all = None not in ours, None not in theirs
    if ours_all and theirs_all:
        return verdict(ours, theirs, higher_is_better=False)
    if ours_all and set(theirs) == {None}:
        return BETTER
    if theirs_all and set(ours) == {None}:
        return WORSE
    return UNDECIDED


def mean_present(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None, or None where none is."""
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None
