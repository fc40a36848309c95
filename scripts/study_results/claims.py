"""The paper's claims tested on a grid (``<files>_claims.md``), one section a claim, each verdict
from the seeds' 95% intervals (intervals.py): one side is better than the other only where the
intervals of their means do not overlap.

Every section is a function of one Evidence (the grid's finished runs by cell, its baseline, its
Fig. 8 gaps) that returns its markdown lines; SECTIONS lists them in the file's order. A new claim
is one such function, added to SECTIONS; ``comparisons`` sets normalizers against each other under
any measure and ``claim_verdict`` sums its verdicts up.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from run_records import Run

from .experiments import GRIDS, PAPER_SPEED_CLAIM, REACH_FRACTION, REFERENCE_ACCURACIES, Grid, Setting
from .intervals import BETTER, LEVEL, UNDECIDED, WORSE, speed_verdict, value_text, verdict
from .measures import OPTIONS, final_top1s, option_gaps, rows_of, steps_to_reach
from .normalizers import AUTHORS_BKN, DEFAULT_BKN, label, variant_key
from .variance_gap import VarianceGaps

Cells = dict[tuple[Setting, str], list[Run]]  # finished runs by (setting, variant)
Measure = Callable[[Sequence[Run]], list]  # a value per run of a cell (None: it has none)
Comparison = tuple[Setting, str, str, str, str]  # setting, variant, against, measure, verdict


@dataclass(frozen=True)
class Evidence:
    """What the sections of a grid's claims read."""

    experiment: str
    grid: Grid
    cells: Cells
    settings: list[Setting]  # every setting with runs, the largest first
    micro: list[Setting]  # every setting but the baseline's
    baseline: float | None  # the BN baseline's final top-1 (population statistics); None: not finished
    gaps: VarianceGaps  # the Fig. 8 analogue's gaps of the runs measured, by run name


def per_option(values: Callable[..., list]) -> dict[str, Measure]:
    """``values(runs, inference=...)`` under each inference option, as measures named B and A."""
    return {option: functools.partial(values, inference=inference) for option, inference in OPTIONS.items()}


def comparisons(cells: Cells, pairs: Sequence[tuple[Setting, str, str]], measures: dict[str, Measure],
                judge: Callable[[list, list], str], digits: int) -> tuple[list[str], list[Comparison]]:
    """A markdown table setting ``variant`` against ``against`` for each (setting, variant, against) of
    ``pairs`` that has runs of both: per measure both sides and ``judge``'s verdict; and the verdicts."""
    lines = ["| setting | normalizer | against | " + " | ".join(f"{title}: it | {title}: against | {title}: verdict"
                                                          for title in measures) + " |",
             "|---|---|---|" + "---|" * 3 * len(measures)]
    verdicts = []
    for setting, variant, against in pairs:
        if (setting, variant) not in cells or (setting, against) not in cells:
            continue
        row = [f"({setting[0]}, {setting[1]})", label(variant), label(against)]
        for title, values in measures.items():
            ours, theirs = values(cells[setting, variant]), values(cells[setting, against])
            word = judge(ours, theirs)
            verdicts.append((setting, variant, against, title, word))
            shown = f"**{word}**" if word in (BETTER, WORSE) else word
            row += [value_text(ours, digits), value_text(theirs, digits), shown]
        lines.append("| " + " | ".join(row) + " |")
    return lines, verdicts


def claim_verdict(verdicts: Sequence[Comparison]) -> str:
    """A claim holds where every one of its comparisons is BETTER, in part where some are, and is not
    shown where none is; it is not testable yet where every comparison is UNDECIDED (or there is none)."""
    words = [comparison[-1] for comparison in verdicts]
    if words.count(UNDECIDED) == len(words):
        overall = "not testable yet"
    elif words.count(BETTER) == len(words):
        overall = "holds"
    else:
        overall = "holds in part" if BETTER in words else "not shown"
    counts = ", ".join(f"{word} in {words.count(word)}" for word in (BETTER, LEVEL, WORSE, UNDECIDED))
    return f"**Verdict: {overall}** ({len(words)} comparisons: {counts})."


def reference_lines(evidence: Evidence) -> list[str]:
    """Our BN baseline and our best mean beside the data set's reference accuracies, each labelled as whose."""
    cells, baseline = evidence.cells, evidence.grid.baseline
    means = [(statistics.fmean(values), setting, variant, option) for (setting, variant), group in cells.items()
             for option, inference in OPTIONS.items() if (values := final_top1s(group, inference))]
    lines = ["## Beside the data set's reference accuracies (theirs, not ours)", "",
             "The Fashion-MNIST README (github.com/zalandoresearch/fashion-mnist, its benchmark table) lists test "
             "accuracies that contributors submitted and the data set's authors did not check. Those networks train "
             "on all 60,000 training images with their own schedules and preprocessing; ours train the study's small "
             "network on its training subset (configs/experiment/study_fashion.yaml). Top-1 % on the 10,000 test "
             "images; ours: mean [95% interval] over the seeds.", "",
             "| network | top-1 % | whose |", "|---|---|---|",
             f"| BN at {baseline}, B | {value_text(final_top1s(cells.get((baseline, 'bn'), []), 'population'), 1)} "
             "| ours: the baseline |"]
    if means:
        _, setting, variant, option = max(means)
        best = value_text(final_top1s(cells[setting, variant], OPTIONS[option]), 1)
        lines.append(f"| {label(variant)} at {setting}, {option} | {best} | ours: the grid's best mean |")
    lines += [f"| {network} | {top1:.1f} | theirs: a contributor's, in the data set's README ({preprocessing}) |"
              for network, top1, preprocessing in REFERENCE_ACCURACIES[evidence.experiment]]
    return lines + [""]


def accuracy_claim(evidence: Evidence) -> list[str]:
    """Claim (a): each BKN against BN and BRN at the micro-batch settings, final top-1."""
    cells, grid, micro = evidence.cells, evidence.grid, evidence.micro
    pairs = [(setting, bkn, other) for setting in micro for bkn in grid.bkn for other in ("bn", "brn")]
    table, verdicts = comparisons(cells, pairs, per_option(final_top1s), verdict, 1)
    return ["## (a) BKN is more accurate than BN and BRN at micro-batches", "",
            "The paper (Figs. 3-7, ImageNet): with small statistics batches BKN's top-1 lies above BN's and BRN's. "
            f"Here: final top-1 %, each BKN against BN and BRN at every setting but the baseline {grid.baseline}.",
            "", claim_verdict(verdicts), "", *table, ""]


def speed_claim(evidence: Evidence) -> list[str]:
    """Claim (b): each BKN against BN and BRN at the micro-batch settings, steps to 95% of the baseline."""
    cells, grid, micro, baseline = evidence.cells, evidence.grid, evidence.micro, evidence.baseline
    lines = ["## (b) BKN converges faster", "",
             f"{PAPER_SPEED_CLAIM} The paper's Fig. 7: at (8, 2) BKN converges faster than BN and BRN.", ""]
    if baseline is None:
        return lines + [f"Not testable yet: the BN baseline {grid.baseline} has not finished.", ""]
    threshold = REACH_FRACTION * baseline
    pairs = [(setting, bkn, other) for setting in micro for bkn in grid.bkn for other in ("bn", "brn")]
    table, verdicts = comparisons(cells, pairs, per_option(functools.partial(steps_to_reach, threshold=threshold)),
                                  speed_verdict, 0)
    return lines + [f"Here: optimizer steps until a run's first evaluation ({grid.evaluations}) at or above "
                    f"{REACH_FRACTION:.0%} of the BN baseline's final top-1 ({threshold:.1f}% of {baseline:.1f}%; "
                    f"{grid.files.format('steps_to_baseline')}.md), over the seeds that reach it. Faster (better) "
                    "where both sides reach it on every seed and the intervals do not overlap, or where one side "
                    "reaches it on every seed and the other on none; any other mix is undecided.", "",
                    claim_verdict(verdicts), "", *table, ""]


def statistics_claim(evidence: Evidence) -> list[str]:
    """Claim (c): each BKN against BN at the micro-batch settings, by two measures from every seed: the
    gap between the inference options, and the Fig. 8 analogue's variance gap where it was measured."""
    cells, grid, micro, gaps = evidence.cells, evidence.grid, evidence.micro, evidence.gaps
    pairs = [(setting, bkn, "bn") for setting in micro for bkn in grid.bkn]
    smaller_is_better = functools.partial(verdict, higher_is_better=False)
    table, verdicts = comparisons(cells, pairs, {"A-B gap": option_gaps}, smaller_is_better, 1)
    lines = ["## (c) BKN's statistics stay closer to the population statistics", "",
             "The paper (Fig. 8, CIFAR-10): the variance BKN normalizes with lies closer to its moving variance than "
             "BN's. Two measures here, each from every seed, each BKN against BN at every setting but the baseline; "
             "smaller is better in both. The A-B gap: the points between a run's top-1 with each test group's own "
             "statistics (A) and with the population statistics (B), either way round; a small gap means the "
             "statistics a layer normalizes with are close to the population statistics it is tested with. The "
             "Fig. 8 analogue's variance gap (below)."]
    name = grid.files.format("variance_gap")
    if any(run.name in gaps for group in cells.values() for run in group):
        def variance_gaps(runs: Sequence[Run], relative: bool) -> list[float | None]:
            return [gaps[run.name][relative] if run.name in gaps else None for run in runs]

        def judge(ours: list, theirs: list) -> str:  # on the seeds that were measured
            return smaller_is_better([v for v in ours if v is not None], [v for v in theirs if v is not None])

        measures = {"variance gap": functools.partial(variance_gaps, relative=False),
                    "gap / moving variance": functools.partial(variance_gaps, relative=True)}
        fig8_table, fig8_verdicts = comparisons(cells, pairs, measures, judge, 3)
        fig8 = ["", f"The Fig. 8 analogue ({name}.md), at one layer, per seed: the mean |variance normalized with - "
                "moving variance| as the paper draws it, and the same relative to the moving variance, which does "
                "not depend on the scale a network's activations took in training; (k/n): k of the n finished "
                "seeds were measured.", "", *fig8_table]
    else:
        fig8_verdicts = []
        fig8 = ["", f"The Fig. 8 analogue ({name}.md) was not measured here: it needs the runs' checkpoints "
                "(`make study` without --no-checkpoints)."]
    return lines + ["", claim_verdict(verdicts + fig8_verdicts), "", *table, *fig8, ""]


def where_gn_wins(evidence: Evidence) -> list[str]:
    """Where GN wins: GN against every other normalizer of the grid at every setting, final top-1."""
    cells = evidence.cells
    others = sorted({variant for _, variant in cells if variant != "gn"}, key=variant_key)
    pairs = [(setting, "gn", other) for setting in evidence.settings for other in others]
    table, verdicts = comparisons(cells, pairs, per_option(final_top1s), verdict, 1)
    wins: dict[tuple[Setting, str], list[str]] = defaultdict(list)
    for setting, _, against, option, word in verdicts:
        if word == BETTER:
            wins[setting, against].append(option)
    where = "; ".join(f"{label(against)} at {setting} with {' and '.join(options)}"
                      for (setting, against), options in wins.items())
    if where:
        finding = f"GN is better than {where}."
    elif all(word == UNDECIDED for *_, word in verdicts):
        finding = "no comparison is decided yet (each needs two finished seeds a side)."
    else:
        finding = "GN is better than none of them anywhere."
    return ["## Where GN wins", "",
            "GN normalizes each example by itself, so the batch does not touch it (its A is its B). GN against "
            f"every other normalizer at every setting: {finding}", "", *table, ""]


# The claims file's sections, in its order: a new claim is a function of Evidence added here.
SECTIONS: tuple[Callable[[Evidence], list[str]], ...] = (reference_lines, accuracy_claim, speed_claim,
                                                        statistics_claim, where_gn_wins)


def write_claims(experiment: str, runs: Sequence[Run], baseline: float | None, gaps: VarianceGaps,
                 out_dir: Path) -> None:
    """Writes ``<files>_claims.md``: the data set's reference accuracies beside ours, then the paper's
    claims tested one by one at every setting but the baseline, each with a verdict from the numbers
    (``gaps``: the Fig. 8 analogue's mean gaps, where measured), and where GN wins."""
    grid = GRIDS[experiment]
    cells = {key: [run for run in group if run.finished] for key, group in rows_of(runs).items()}
    settings = list(dict.fromkeys(setting for setting, _ in cells))
    micro = [setting for setting in settings if setting != grid.baseline]
    evidence = Evidence(experiment, grid, cells, settings, micro, baseline, gaps)
    lines = [f"# {experiment}: the paper's claims, tested", "",
             f"{label(DEFAULT_BKN)} is BKN as configured by default, {label(AUTHORS_BKN)} the authors' code exactly. "
             "Each comparison sets one normalizer (it) against another at one setting: the mean over the finished "
             "seeds and its 95% confidence interval (Student's t, n - 1 degrees of freedom; (k/n): only k of the n "
             "seeds have a value). **better** / **worse**: the two intervals do not overlap; level: they do, the "
             "difference lies inside the seeds' spread; undecided: a side has fewer than two seeds. A claim holds "
             "where every one of its comparisons is better, holds in part where some are, and is not shown where "
             "none is. B: population statistics (option B); A: each test group's own statistics (option A).", "",
             *(line for section in SECTIONS for line in section(evidence)),
             "Regenerate: `make study` (after the parts have run: `make study PART=fashion_all`)."]
    (out_dir / f"{grid.files.format('claims')}.md").write_text("\n".join(lines) + "\n")
