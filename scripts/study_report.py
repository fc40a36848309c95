"""Write results/study/ from the study's run records (scripts/study.py): tables, figures, the
convergence check and the wall time of each part.

For each experiment of the study (``study``: the main grid; ``study_hard``: the harder digits;
``study_state``: what BKN passes on; ``study_stall``: the recipe BKN-analytic stalled under;
``study_quick``: the first look; ``study_fashion``: the Fashion-MNIST grid; ``study_fashion_quick``:
its first try; ``study_speed``: runs of the main grid again on newer code) that has runs it writes ``<experiment>.md``,
``.csv`` and ``.png``: per setting and normalizer the final top-1 under both inference options
(mean ± std over the finished seeds and the mean's 95% confidence interval) and the final training
loss; the figure draws top-1 against steps, a panel per setting and option. Each grid (main, hard,
Fashion-MNIST) also gets ``<files>_final.png``: every seed's final top-1 with the mean and its 95%
interval, zoomed to where the normalizers differ. From the main grid it also writes
``steps_to_baseline.md`` (optimizer steps and examples until a run first reaches 95% of the
large-batch BN baseline's final top-1) and ``variance_gap.{md,png}`` (the Fig. 8 analogue), and the
same from the harder digits against their own baseline (``steps_to_baseline_hard.md``,
``variance_gap_hard.{md,png}``) and from the Fashion-MNIST grid against its (128, 128) baseline
(``study_fashion_steps_to_baseline.md``, ``study_fashion_variance_gap.{md,png}``), with
``study_fashion_claims.md``: the data set's reference accuracies (theirs) beside ours, and the
paper's claims tested one by one (BKN more accurate than BN and BRN at micro-batches, faster to 95%
of the baseline, its statistics closer to the population statistics; where GN wins), each verdict
computed from the seeds' 95% intervals; from the
main grid and from ``study_state``, ``prior_fit.md`` / ``prior_fit_state.md`` (scripts/prior_fit.py:
how far each BKN layer's prior lies from what it observes), and the same before any training,
``prior_fit_initial.md``. A rerun (``study_speed``) is set beside the runs it repeats in
``study_speed_against_study.md``: accuracy within the seeds' range, and wall time.

Each finished run's record (summary.json, config.yaml, metrics.jsonl: no checkpoint) is copied to
``results/study/records/``, which is committed: the tables regenerate from it on any machine, and
scripts/study.py counts those runs as finished. What needs a trained network uses the runs whose
checkpoint is still in the runs dir: the prior fit, and the Fig. 8 analogue, whose measurement of
each run is then kept in its record (``variance_gap.json``), so that the table grows across machines.

The first line of results/study/README.md is this script's: whether the study converged (the
large-batch BN baseline at >= 97% top-1 with population statistics), how far the Fashion-MNIST grid
has run and whether its baseline reaches 91%, and each part's wall time
(records/wall_times.jsonl, merged from study.py's logs). The rest of the README is written by
hand from these files and is left as it is.

    python scripts/study_report.py                      # runs/study -> results/study
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from scipy.stats import t as student_t

from bkn.engine.checkpoint import checkpoint_path

import plots
import prior_fit
import study
from fig8_statistics import Gaps, measure, plot
from run_records import Run, load_local

EXPERIMENTS = {
    "study": "BN, BRN, GN and BKN on digits, trained to convergence",
    "study_hard": "the harder digits (500 training images, pixel noise std 0.3)",
    "study_state": "what BKN passes on to the next layer's prediction: its output's statistics or its input's",
    "study_quick": "first look: (32, 2), 10 epochs, one seed (not converged by design)",
    "study_stall": "the recipe BKN-analytic stalled under: lr 0.05, no warm-up, 1,500 steps at (32, 1)",
    "study_fashion": "BN, BRN, GN, the default BKN and the authors' BKN on Fashion-MNIST, trained to convergence",
    "study_fashion_quick": "Fashion-MNIST's first try: (128, 128) and (16, 1), 2 epochs, one seed (not converged "
                           "by design)",
    "study_robustness": "the default command's recipe (no warm-up, 300 steps) over learning rates",
    "study_speed": "the main grid's (8, 2) seed 0 again, as configured then, on the code after the micro-batch "
                   "speed-up",
}
# A rerun of some of an experiment's runs (same names and configs) on newer code: experiment -> the one it reruns.
RERUNS = {"study_speed": "study"}
# Robustness: a run "trains" when its better inference option reaches TRAINS_TOP1; the default BKN
# must then be within DEFAULT_MARGIN points of BN's better option wherever BN trains.
TRAINS_TOP1, DEFAULT_MARGIN, DEFAULT_BKN = 90.0, 2.0, "bkn-linear"
AUTHORS_BKN = "bkn-monte_carlo-state_input"  # the authors' code exactly
CONVERGED_TOP1 = 97.0  # the main grid's baseline must reach it (README status line)
FASHION_CONVERGED_TOP1 = 91.0  # and the Fashion-MNIST grid's


Setting = tuple[int, int]  # the paper's (gradient-batch-size, statistics-batch-size)
VarianceGaps = dict[str, tuple[float, float]]  # Fig. 8 analogue: a run's mean gap and mean gap / moving variance


@dataclass(frozen=True)
class Grid:
    """An experiment with a large-batch BN baseline of its own: it gets a speed table and a Fig. 8 analogue."""

    baseline: Setting  # the BN baseline's
    files: str  # its files' names, "{}" standing for steps_to_baseline, variance_gap or claims
    evaluations: str  # how often its runs are evaluated
    bkn: tuple[str, ...]  # the BKN variants its Fig. 8 analogue (and claims) set beside BN


GRIDS = {
    "study": Grid((64, 64), "{}", "one per epoch", ("bkn-linear", "bkn-analytic")),
    "study_hard": Grid((64, 64), "{}_hard", "one per epoch", ("bkn-linear", "bkn-analytic")),
    "study_fashion": Grid((128, 128), "study_fashion_{}", "one every 3 epochs", (DEFAULT_BKN, AUTHORS_BKN)),
}
# What top-1 is measured on, and what option A keeps of it (whole statistics groups only); digits where not named.
DIGITS_TEST = ("the 360 test images", "320 of the 360 at 64 a group")
TEST_SETS = {experiment: ("the 10,000 test images", "9,984 of the 10,000 at 128 a group")
             for experiment in ("study_fashion", "study_fashion_quick")}
# Grids whose claims <files>_claims.md tests one by one, with the data set's reference accuracies to set beside
# ours: (network, top-1 %, its preprocessing), from the benchmark table of github.com/zalandoresearch/fashion-mnist.
CLAIMS = {"study_fashion": (("2 Conv+pooling+BN", 93.4, "no preprocessing"),
                            ("ResNet18", 94.9, "normalization, random flips, translations and rotations"),
                            ("WRN-28-10", 95.9, "mean/std standardization, random crops and horizontal flips"))}
REACH_FRACTION = 0.95  # convergence speed: steps until 95% of the baseline's final top-1
# Training loss flat: the mean of the last 10% of steps at most 20% (or 0.01) below that of the 10% before.
FLAT_TOLERANCE, FLAT_ABSOLUTE = 0.2, 0.01
ORDER = ("bn", "brn", "gn", "bkn-linear", "bkn-monte_carlo", "bkn-analytic")  # then BKN's variants
NAMES = {"bn": "BN", "brn": "BRN", "gn": "GN", "bkn": "BKN"}
PAPER_SPEED_CLAIM = ("Paper (Table 1, InceptionV2 on ImageNet at (256, 32)): BKN reaches BN's final top-1 "
                     "in 41.2% fewer steps (100k against 170k).")
README_STATUS_PREFIX = "Status:"
PRIOR_FIT = {"study": "prior_fit.md", "study_state": "prior_fit_state.md"}


def label(variant: str) -> str:
    name, _, detail = variant.partition("-")
    return NAMES[name] + (f" ({detail.replace('-', ', ')})" if detail else "")


def variant_key(variant: str) -> tuple[int, str]:
    base = "-".join(variant.split("-")[:2])
    return (ORDER.index(base) if base in ORDER else len(ORDER), variant)


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


def rows_of(runs: Sequence[Run]) -> dict[tuple[tuple[int, int], str], list[Run]]:
    rows: dict[tuple[tuple[int, int], str], list[Run]] = defaultdict(list)
    for run in runs:
        rows[run.setting, run.variant].append(run)
    return dict(sorted(rows.items(), key=lambda item: ((-item[0][0][0], -item[0][0][1]), variant_key(item[0][1]))))


def baseline_top1(runs: Sequence[Run], setting: Setting) -> float | None:
    """The BN baseline's final top-1 at ``setting`` (population statistics), mean over its finished seeds."""
    values = [top1 for run in runs if run.finished and run.setting == setting and run.variant == "bn"
              and (top1 := run.final("population")) is not None]
    return statistics.fmean(values) if values else None


def final_top1s(runs: Sequence[Run], inference: str) -> list[float]:
    """The final top-1 under ``inference`` of each finished run that recorded one. GN normalizes each
    example with its own statistics, so its option A is its option B."""
    return [top1 for run in runs if run.finished
            and (top1 := run.final("population" if run.variant == "gn" else inference)) is not None]


def write_results_table(experiment: str, runs: Sequence[Run], out_dir: Path) -> None:
    test_images, whole_groups = TEST_SETS.get(experiment, DIGITS_TEST)
    header = ("| setting | normalizer | seeds | top-1 % B: population | B: 95% interval | top-1 % A: batch "
              "| A: 95% interval | final training loss | loss flat | not finished |")
    lines = [f"# {experiment} — {EXPERIMENTS[experiment]}", "",
             f"Mean ± std over the finished seeds, and the mean's 95% confidence interval (Student's t with "
             f"n - 1 degrees of freedom, not clipped to 0-100; — with one seed). Top-1 on {test_images} after "
             "the last step; B: "
             "population (running) statistics, the paper's option B; A: each test statistics group's own "
             f"statistics, option A, on whole groups only ({whole_groups}; GN has per-example statistics, "
             "so its A is its B). Final training loss: "
             f"mean of the last 10% of logged steps; loss flat: the runs whose last 10% lie at most "
             f"{FLAT_TOLERANCE:.0%} (or {FLAT_ABSOLUTE:g}) below the 10% before. Not finished: runs with another status (diverged, failed, ...) or that did not learn.",
             "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    records = []
    for (setting, variant), group in rows_of(runs).items():
        finished = [run for run in group if run.finished]
        population, batch = final_top1s(group, "population"), final_top1s(group, "batch")
        losses = [v for run in finished if (v := final_loss(run)) is not None]
        flat = [run for run in finished if loss_is_flat(run)]
        others = sorted(f"{run.name}: {run.verdict}" for run in group if not (run.finished and run.learned))
        batch_cells = ["= B", "= B"] if variant == "gn" else [mean_std(batch, 1), interval_text(batch, 1)]
        lines.append(f"| ({setting[0]}, {setting[1]}) | {label(variant)} | {len(finished)} | {mean_std(population, 1)} "
                     f"| {interval_text(population, 1)} | {' | '.join(batch_cells)} | {mean_std(losses, 3)} "
                     f"| {len(flat)}/{len(finished)} | {'; '.join(others) or '—'} |")
        for run in group:
            records.append({"experiment": experiment, "setting": f"({setting[0]}, {setting[1]})", "normalizer": variant,
                            "seed": run.summary.get("seed"), "status": run.verdict,
                            "top1_population": run.final("population"), "top1_batch": run.final("batch"),
                            "final_training_loss": final_loss(run), "loss_flat": loss_is_flat(run),
                            "steps": run.summary.get("steps"), "wall_time_s": run.summary.get("wall_time_s")})
    lines += ["", "Regenerate: `make study` (after the parts have run: `make study PART=<part>`)."]
    (out_dir / f"{experiment}.md").write_text("\n".join(lines) + "\n")
    with open(out_dir / f"{experiment}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def write_figure(experiment: str, runs: Sequence[Run], out_dir: Path) -> None:
    panels = []
    by_setting: dict[tuple[int, int], list[tuple[str, list[Run]]]] = defaultdict(list)
    for (setting, variant), group in rows_of(runs).items():
        by_setting[setting].append((variant, [run for run in group if run.finished]))
    for setting, rows in by_setting.items():
        for inference in ("population", "batch"):
            curves = [plots.Curve(label(variant), variant.split("-")[0], False, [run.curve(inference) for run in group],
                                  transition=variant.partition("-")[2] or None)
                      for variant, group in rows if not (inference == "batch" and variant == "gn")]
            panels.append(plots.Panel(f"setting {setting}, {plots.INFERENCE_TITLES[inference]}", curves))
    plots.plot_panels(panels, f"{experiment}: {EXPERIMENTS[experiment]}", out_dir / f"{experiment}.png", 2)


ZOOM_POINTS = 10.0  # the final-top-1 figure shows the points within this much of each panel's best mean


def zoomed_range(cells: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The top-1 axis of a panel of the final-top-1 figure: every seed and interval bound of the cells
    whose mean lies within ZOOM_POINTS of the best mean (two seeds give wide intervals), clipped to
    that zoom and to 100, with half a point to spare."""
    means = [statistics.fmean(values) for values in cells if values]
    bottom = max(means) - ZOOM_POINTS
    shown = [bound for values in cells if values and statistics.fmean(values) >= bottom
             for bound in (*values, *(interval(values) or ()))]
    return max(min(shown), bottom) - 0.5, min(max(shown) + 0.5, 100.0)


def write_final_figure(experiment: str, runs: Sequence[Run], out_dir: Path) -> None:
    """``<files>_final.png`` (the grid's ``final``): the final top-1 of every seed (dots), their mean (bar)
    and its 95% interval, a panel per setting and inference option. The curves' 0-100 axis hides the
    differences that matter; here each panel zooms to within ZOOM_POINTS of its best mean, and a cell
    below that is drawn as a marker at the bottom edge, labelled with its mean."""
    import matplotlib.pyplot as plt  # plots.py has chosen the file-only backend
    cells = {key: group for key, group in rows_of(runs).items() if any(run.finished for run in group)}
    settings = list(dict.fromkeys(setting for setting, _ in cells))
    if not settings:
        return
    figure, axes = plt.subplots(2, len(settings), figsize=(4.6 * len(settings), 7.6), squeeze=False,
                                layout="constrained")
    for column, setting in enumerate(settings):
        variants = [variant for s, variant in cells if s == setting]
        for row, (option, inference) in enumerate(OPTIONS.items()):
            axis = axes[row, column]
            values = {variant: final_top1s(cells[setting, variant], inference) for variant in variants}
            means = {variant: statistics.fmean(v) for variant, v in values.items() if v}
            if not means:
                axis.set_visible(False)
                continue
            low, high = zoomed_range(list(values.values()))
            for x, variant in enumerate(variants):
                name, _, transition = variant.partition("-")
                colour = plots.color(name, transition or None)
                if variant not in means:
                    continue
                if means[variant] < low:  # collapsed: off the zoomed axis
                    axis.plot([x], [low], marker="v", markersize=10, color=colour, clip_on=False)
                    axis.annotate(f"{means[variant]:.1f}", (x, low), textcoords="offset points", xytext=(0, 8),
                                  ha="center", fontsize=8, color=colour)
                    continue
                seeds = values[variant]
                axis.scatter([x + 0.08 * (i - (len(seeds) - 1) / 2) for i in range(len(seeds))], seeds,
                             s=14, color=colour, alpha=0.6, zorder=3)
                bounds = interval(seeds)
                if bounds is not None:
                    axis.errorbar([x], [means[variant]], yerr=[[means[variant] - bounds[0]], [bounds[1] - means[variant]]],
                                  fmt="none", ecolor=colour, capsize=5, linewidth=1.2, zorder=2)
                axis.plot([x - 0.2, x + 0.2], [means[variant]] * 2, color=colour, linewidth=2.5, zorder=4)
            axis.set_ylim(low, high)
            axis.set_xlim(-0.6, len(variants) - 0.4)
            axis.set_xticks(range(len(variants)),
                            [label(variant).replace(" (", "\n(").replace(", ", ",\n") + (" = B" if variant == "gn" and option == "A" else "")
                             for variant in variants], fontsize=7)
            axis.set_title(f"setting ({setting[0]}, {setting[1]}), {plots.INFERENCE_TITLES[inference]}", fontsize=9)
            axis.set_ylabel("final top-1 (%)")
            axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{experiment}: final top-1, each seed (dots), mean (bar) and its 95% interval; each panel "
                    f"zoomed to {ZOOM_POINTS:g} points below its best mean (\u25bc: a mean below that)", fontsize=10)
    figure.savefig(out_dir / f"{GRIDS[experiment].files.format('final')}.png", dpi=110)
    plt.close(figure)


def first_reach(run: Run, inference: str, threshold: float) -> int | None:
    return next((step for step, top1 in run.curve(inference) if top1 >= threshold), None)


def steps_to_reach(runs: Sequence[Run], inference: str, threshold: float) -> list[int | None]:
    """Per finished run, the step of its first evaluation at or above ``threshold`` (None: never)."""
    return [first_reach(run, "population" if run.variant == "gn" else inference, threshold)
            for run in runs if run.finished]


def write_steps_to_baseline(experiment: str, runs: Sequence[Run], baseline: float, out_dir: Path) -> None:
    """Writes the grid's ``steps_to_baseline`` table: per setting and normalizer, the steps to 95% of ``baseline``."""
    grid = GRIDS[experiment]
    threshold = REACH_FRACTION * baseline
    lines = [f"# Convergence speed ({experiment}: {EXPERIMENTS[experiment]}): optimizer steps (and examples) "
             "to reach 95% of the baseline", "",
             f"The large-batch BN baseline {grid.baseline} reaches {baseline:.1f}% top-1 (population statistics, "
             f"mean over seeds); the threshold is {REACH_FRACTION:.0%} of that, {threshold:.1f}%. Per run: the first "
             f"evaluation ({grid.evaluations}) at or above it; mean over the seeds that reach it, and how many do. "
             "Examples = steps x gradient batch.", "",
             "| setting | normalizer | B: steps | B: examples | B: seeds reaching | A: steps | A: examples "
             "| A: seeds reaching |", "|---|---|---|---|---|---|---|---|"]
    for (setting, variant), group in rows_of(runs).items():
        finished = [run for run in group if run.finished]
        if not finished:  # still running: nothing to say yet
            continue
        cells = []
        for inference in ("population", "batch"):
            if inference == "batch" and variant == "gn":
                cells += ["= B", "= B", "= B"]
                continue
            steps = [s for s in steps_to_reach(finished, inference, threshold) if s is not None]
            mean = statistics.fmean(steps) if steps else None
            cells += ["—" if mean is None else f"{mean:.0f}", "—" if mean is None else f"{mean * setting[0]:,.0f}",
                      f"{len(steps)}/{len(finished)}"]
        lines.append(f"| ({setting[0]}, {setting[1]}) | {label(variant)} | " + " | ".join(cells) + " |")
    lines += ["", f"- {PAPER_SPEED_CLAIM} Ours is a different network, data set and scale.",
              "", "Regenerate: `make study`."]
    (out_dir / f"{grid.files.format('steps_to_baseline')}.md").write_text("\n".join(lines) + "\n")


GAPS_FILE = "variance_gap.json"  # a run's Fig. 8 measurement, kept with its record (the checkpoint is not)


def run_gaps(run: Run) -> Gaps:
    """The run's Fig. 8 gaps: measured from its checkpoint the first time and written beside its
    record, so that a later report (another machine, without the checkpoint) reads them back."""
    saved = run.directory / GAPS_FILE
    if saved.exists():
        data = json.loads(saved.read_text())
        return Gaps(run, data["layer"], *(torch.tensor(data[key]) for key in ("normalizing", "sample", "moving")))
    gaps = measure(run, None, 64, torch.device("cpu"))
    saved.write_text(json.dumps({"layer": gaps.layer, **{key: getattr(gaps, key).tolist()
                                                        for key in ("normalizing", "sample", "moving")}}))
    return gaps


def has_gaps(run: Run, measure_checkpoints: bool) -> bool:
    """Whether the run's Fig. 8 gaps can be had: saved with its record, or (``measure_checkpoints``)
    measured from its checkpoint."""
    if run.directory is None:
        return False
    return (run.directory / GAPS_FILE).exists() or (measure_checkpoints and checkpoint_path(run.directory).exists())


def write_variance_gap(experiment: str, runs: Sequence[Run], out_dir: Path) -> VarianceGaps:
    """Fig. 8 from the study's trained runs: |variance normalized with - moving variance|, BN vs BKN.
    Every finished seed with gaps counts: the grid's ``variance_gap`` table gives, per setting and
    variant, the mean gap of each seed and their mean with its 95% interval, and a heat map per setting
    draws the lowest seed. Returns each measured run's mean gap and mean relative gap (gap / moving
    variance: networks trained apart differ in scale), by run name."""
    grid = GRIDS[experiment]
    name = grid.files.format("variance_gap")
    lines = ["# Fig. 8 analogue: batch variance against moving variance in the trained study networks", "",
             "Every finished seed whose network was measured; the deepest normalization layer after a 3x3 conv; "
             "64 test statistics groups of inference option A. Gap: |variance the layer normalizes with - its "
             "moving variance| (BN: the group's sample variance; BKN: its Kalman estimate), unbiased. Per seed its "
             "mean over channels and groups; over the seeds their mean and its 95% interval (Student's t). The "
             "paper (Fig. 8): BKN's gaps are smaller than BN's (no number given).", "",
             "| setting | normalizer | layer | seeds | mean gap per seed | mean gap [95% interval] "
             "| median gap | mean gap / moving variance |", "|---|---|---|---|---|---|---|---|"]
    mean_gaps: VarianceGaps = {}
    for setting in sorted({run.setting for run in runs}, key=lambda s: (-s[0], -s[1])):
        measured = {variant: sorted((run for run in runs if run.finished and run.setting == setting
                                     and run.variant == variant), key=lambda run: run.summary.get("seed", 0))
                    for variant in ("bn", *grid.bkn)}
        measured = {variant: group for variant, group in measured.items() if group}
        # Measured (and kept with the records) also where the setting still lacks a side, so that a
        # run's checkpoint is not needed again once the rest of its setting has run.
        gaps = {variant: [run_gaps(run) for run in group] for variant, group in measured.items()}
        if "bn" not in gaps or len(gaps) < 2:
            continue
        for variant, seeds in gaps.items():
            means = [float(gap.normalizing.mean()) for gap in seeds]
            relatives = [float((gap.normalizing / (gap.moving[:, None] + 1e-12)).mean()) for gap in seeds]
            mean_gaps.update({gap.run.name: pair for gap, pair in zip(seeds, zip(means, relatives))})
            bounds = interval(means)
            spread = "" if bounds is None else f" [{bounds[0]:.4g}, {bounds[1]:.4g}]"
            medians = statistics.fmean(float(gap.normalizing.median()) for gap in seeds)
            relative = statistics.fmean(relatives)
            per_seed = ", ".join(f"{mean:.4g}" for mean in means)
            lines.append(f"| ({setting[0]}, {setting[1]}) | {label(variant)} | `{seeds[0].layer}` | "
                         f"{', '.join(str(gap.run.summary.get('seed')) for gap in seeds)} | {per_seed} | "
                         f"{statistics.fmean(means):.4g}{spread} | {medians:.4g} | {relative:.4g} |")
        plot({variant: seeds[0] for variant, seeds in gaps.items()},
             f"{experiment} at {setting}, each normalizer's lowest seed: |batch variance - moving variance|, "
             "channels x test groups", out_dir / f"{name}_g{setting[0]}_s{setting[1]}.png")
    lines += ["", f"Heat maps (each setting's lowest seed): {name}_g<gradient>_s<statistics>.png. "
              "Regenerate: `make study`."]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return mean_gaps


# The paper's claims, tested (write_claims): one side is better than the other only where the 95%
# intervals of their means do not overlap.
BETTER, WORSE, LEVEL, UNDECIDED = "better", "worse", "level", "undecided"
OPTIONS = {"B": "population", "A": "batch"}  # the paper's inference options
Cells = dict[tuple[Setting, str], list[Run]]  # finished runs by (setting, variant)
Measure = Callable[[Sequence[Run]], list]  # a value per run of a cell (None: it has none)
Comparison = tuple[Setting, str, str, str, str]  # setting, variant, against, measure, verdict


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


def option_gaps(runs: Sequence[Run]) -> list[float]:
    """Per finished run, |top-1 with batch statistics (A) - top-1 with population statistics (B)|."""
    return [abs(batch - population) for run in runs if run.finished
            and (batch := run.final("batch")) is not None and (population := run.final("population")) is not None]


def per_option(values: Callable[..., list]) -> dict[str, Measure]:
    """``values(runs, inference=...)`` under each inference option, as measures named B and A."""
    return {option: functools.partial(values, inference=inference) for option, inference in OPTIONS.items()}


def value_text(values: Sequence[float | None], digits: int) -> str:
    """The mean of the values present with its 95% interval, and how many are present where some are not."""
    present = [value for value in values if value is not None]
    text = "—" if not present else f"{statistics.fmean(present):.{digits}f}"
    if len(present) > 1:
        text += f" {interval_text(present, digits)}"
    return text + (f" ({len(present)}/{len(values)})" if len(present) < len(values) else "")


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


def reference_lines(experiment: str, cells: Cells) -> list[str]:
    """Our BN baseline and our best mean beside the data set's reference accuracies, each labelled as whose."""
    baseline = GRIDS[experiment].baseline
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
              for network, top1, preprocessing in CLAIMS[experiment]]
    return lines + [""]


def accuracy_claim(cells: Cells, grid: Grid, micro: Sequence[Setting]) -> list[str]:
    """Claim (a): each BKN against BN and BRN at the micro-batch settings, final top-1."""
    pairs = [(setting, bkn, other) for setting in micro for bkn in grid.bkn for other in ("bn", "brn")]
    table, verdicts = comparisons(cells, pairs, per_option(final_top1s), verdict, 1)
    return ["## (a) BKN is more accurate than BN and BRN at micro-batches", "",
            "The paper (Figs. 3-7, ImageNet): with small statistics batches BKN's top-1 lies above BN's and BRN's. "
            f"Here: final top-1 %, each BKN against BN and BRN at every setting but the baseline {grid.baseline}.",
            "", claim_verdict(verdicts), "", *table, ""]


def speed_claim(cells: Cells, grid: Grid, micro: Sequence[Setting], baseline: float | None) -> list[str]:
    """Claim (b): each BKN against BN and BRN at the micro-batch settings, steps to 95% of the baseline."""
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


def statistics_claim(cells: Cells, grid: Grid, micro: Sequence[Setting], gaps: VarianceGaps) -> list[str]:
    """Claim (c): each BKN against BN at the micro-batch settings, by two measures from every seed: the
    gap between the inference options, and the Fig. 8 analogue's variance gap where it was measured."""
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


def gn_lines(cells: Cells, grid: Grid, settings: Sequence[Setting]) -> list[str]:
    """Where GN wins: GN against every other normalizer at every setting, final top-1."""
    pairs = [(setting, "gn", other) for setting in settings for other in ("bn", "brn", *grid.bkn)]
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


def write_claims(experiment: str, runs: Sequence[Run], baseline: float | None, gaps: VarianceGaps,
                 out_dir: Path) -> None:
    """Writes ``<files>_claims.md``: the data set's reference accuracies beside ours, then the paper's
    claims tested one by one at every setting but the baseline, each with a verdict from the numbers
    (``gaps``: the Fig. 8 analogue's mean gaps, where measured), and where GN wins."""
    grid = GRIDS[experiment]
    cells = {key: [run for run in group if run.finished] for key, group in rows_of(runs).items()}
    settings = list(dict.fromkeys(setting for setting, _ in cells))
    micro = [setting for setting in settings if setting != grid.baseline]
    lines = [f"# {experiment}: the paper's claims, tested", "",
             f"{label(DEFAULT_BKN)} is BKN as configured by default, {label(AUTHORS_BKN)} the authors' code exactly. "
             "Each comparison sets one normalizer (it) against another at one setting: the mean over the finished "
             "seeds and its 95% confidence interval (Student's t, n - 1 degrees of freedom; (k/n): only k of the n "
             "seeds have a value). **better** / **worse**: the two intervals do not overlap; level: they do, the "
             "difference lies inside the seeds' spread; undecided: a side has fewer than two seeds. A claim holds "
             "where every one of its comparisons is better, holds in part where some are, and is not shown where "
             "none is. B: population statistics (option B); A: each test group's own statistics (option A).", "",
             *reference_lines(experiment, cells), *accuracy_claim(cells, grid, micro),
             *speed_claim(cells, grid, micro, baseline), *statistics_claim(cells, grid, micro, gaps),
             *gn_lines(cells, grid, settings),
             "Regenerate: `make study` (after the parts have run: `make study PART=fashion_all`)."]
    (out_dir / f"{grid.files.format('claims')}.md").write_text("\n".join(lines) + "\n")


def best_top1(run: Run) -> float | None:
    """The better of the two inference options' final top-1 (GN has one)."""
    values = [v for inference in ("population", "batch") if (v := run.final(inference)) is not None]
    return max(values) if values else None


def robustness_cells(runs: Sequence[Run]) -> dict[tuple[str, tuple[int, int], float, str], list[Run]]:
    """Finished runs by (model, setting, learning rate, variant)."""
    cells: dict[tuple[str, tuple[int, int], float, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.finished:
            lr = float((run.config.get("optim") or {})["lr"])
            cells[str(run.summary["model"]), run.setting, lr, run.variant].append(run)
    return cells


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def write_robustness(runs: Sequence[Run], out_dir: Path) -> None:
    """study_robustness.{md,csv,png}: top-1 per cell, the largest learning rate each normalizer
    trains at, and whether the default BKN keeps up with BN wherever BN trains."""
    cells = robustness_cells(runs)
    variants = sorted({key[3] for key in cells}, key=variant_key)
    models = sorted({key[0] for key in cells})
    rows = sorted({key[:3] for key in cells}, key=lambda row: (row[0], -row[1][1], row[2]))
    lines = [f"# study_robustness — {EXPERIMENTS['study_robustness']}", "",
             "`python train.py` with the model, setting (g, s), learning rate and normalizer changed: the step "
             "schedule without warm-up, 300 steps on the digits, one evaluation at the end. Each cell: final top-1 "
             "with population statistics (B) / batch statistics (A), mean over the seeds (n); `*`: a seed did "
             f"not learn (training loss not falling or top-1 at chance). A run trains when its better option "
             f"reaches {TRAINS_TOP1:.0f}%.", ""]
    records = []
    for model in models:
        lines += [f"## {model}", "", "| setting | lr | " + " | ".join(label(v) for v in variants) + " |",
                  "|---|---:|" + "---|" * len(variants)]
        for row in [r for r in rows if r[0] == model]:
            texts = []
            for variant in variants:
                group = cells.get((*row, variant), [])
                if not group:
                    texts.append("—")
                    continue
                population = _mean([run.final("population") for run in group])
                batch = _mean([run.final("batch") for run in group])
                text = "—" if population is None else f"{population:.1f}"
                if variant != "gn" and batch is not None:
                    text += f" / {batch:.1f}"
                texts.append(text + ("*" if any(not run.learned for run in group) else "") + f" (n={len(group)})")
                for run in group:
                    records.append({"model": model, "setting": f"({row[1][0]}, {row[1][1]})", "lr": row[2],
                                    "normalizer": variant, "seed": run.summary.get("seed"), "status": run.verdict,
                                    "top1_population": run.final("population"), "top1_batch": run.final("batch")})
            lines.append(f"| ({row[1][0]}, {row[1][1]}) | {row[2]:g} | " + " | ".join(texts) + " |")
        lines.append("")
    lines += ["## The largest learning rate that trains", "",
              f"Per model and setting, the largest learning rate at which the mean over seeds of the better "
              f"option's top-1 reaches {TRAINS_TOP1:.0f}% (the paper claims BKN, like BN, trains with large "
              "learning rates); `none`: at none of the learning rates tried so far.", "",
              "| model | setting | " + " | ".join(label(v) for v in variants) + " |", "|---|---|" + "---|" * len(variants)]
    for model, setting in sorted({key[:2] for key in cells}, key=lambda key: (key[0], -key[1][1])):
        texts = []
        for variant in variants:
            trained = [lr for (m, s, lr, v), group in cells.items() if (m, s, v) == (model, setting, variant)
                       and (top1 := _mean([best_top1(run) for run in group])) is not None and top1 >= TRAINS_TOP1]
            texts.append(f"{max(trained):g}" if trained else "none")
        lines.append(f"| {model} | ({setting[0]}, {setting[1]}) | " + " | ".join(texts) + " |")
    lines += ["", f"## The default BKN ({label(DEFAULT_BKN)}) where BN trains", "",
              f"Every cell where BN's better option reaches {TRAINS_TOP1:.0f}%: the default BKN's better option "
              f"must be within {DEFAULT_MARGIN:.0f} points of it.", "",
              "| model | setting | lr | BN (better option) | default BKN (better option) | within 2 points |",
              "|---|---|---:|---:|---:|---|"]
    for row in rows:
        bn = _mean([best_top1(run) for run in cells.get((*row, "bn"), [])])
        bkn = _mean([best_top1(run) for run in cells.get((*row, DEFAULT_BKN), [])])
        if bn is None or bn < TRAINS_TOP1:
            continue
        verdict = "—" if bkn is None else ("yes" if bkn >= bn - DEFAULT_MARGIN else "**no**")
        lines.append(f"| {row[0]} | ({row[1][0]}, {row[1][1]}) | {row[2]:g} | {bn:.1f} | "
                     f"{'—' if bkn is None else f'{bkn:.1f}'} | {verdict} |")
    lines += ["", "Regenerate: `make study PART=robustness` (or one of its four parts), then `make study`."]
    (out_dir / "study_robustness.md").write_text("\n".join(lines) + "\n")
    if records:
        with open(out_dir / "study_robustness.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    _plot_robustness(cells, variants, out_dir / "study_robustness.png")


def _plot_robustness(cells: dict, variants: Sequence[str], path: Path) -> None:
    """Better option's top-1 against the learning rate, one panel per (model, setting)."""
    import matplotlib.pyplot as plt  # plots.py has chosen the file-only backend
    panels = sorted({key[:2] for key in cells}, key=lambda key: (key[0], -key[1][1]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, layout="constrained")
    for axis, (model, setting) in zip(axes.flat, panels):
        for variant in variants:
            points = sorted((lr, top1) for (m, s, lr, v), group in cells.items() if (m, s, v) == (model, setting, variant)
                            and (top1 := _mean([best_top1(run) for run in group])) is not None)
            if points:
                name, _, transition = variant.partition("-")
                axis.plot(*zip(*points), marker="o", label=label(variant),
                          color=plots.color(name, transition or None),
                          linestyle="--" if variant.endswith("no_gain_warmup") else "-")
        axis.axhline(TRAINS_TOP1, color="gray", linewidth=0.8, linestyle=":")
        axis.set(xscale="log", xlabel="learning rate (no warm-up)", ylabel="top-1 %, better option", ylim=(0, 100),
                 title=f"{model}, setting ({setting[0]}, {setting[1]})")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(EXPERIMENTS["study_robustness"] + " (mean over seeds)", fontsize=11)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_rerun(experiment: str, runs: Sequence[Run], committed: Sequence[Run], out_dir: Path) -> None:
    """``<experiment>_against_<committed>.md``: each rerun beside the committed run of the same name, its
    final top-1 beside the committed seeds' range in that cell, and the wall time of both."""
    original = RERUNS[experiment]
    by_name = {run.name: run for run in committed if run.finished}
    cells = rows_of([run for run in committed if run.finished])
    lines = [f"# {experiment} against {original}: {EXPERIMENTS[experiment]}", "",
             f"Each run of {experiment} has the name and the config of a committed run of {original}; only the "
             "code differs. Top-1 (%) after the last step with population statistics (B) and the test groups' own "
             "(A); \"seeds' range\": min-max of the committed runs of that setting and normalizer over all their "
             "seeds, and whether the rerun lies inside it. Wall time of each run as train.py recorded it "
             "(both ran two one-thread runs at a time on the same kind of 2-core machine).", "",
             "| run | B committed | B rerun | B seeds' range | A committed | A rerun | A seeds' range | inside "
             "| wall s committed | wall s rerun | rerun / committed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    wall_before = wall_after = 0.0
    for run in sorted((run for run in runs if run.finished), key=lambda run: variant_key(run.variant)):
        before = by_name.get(run.name)
        if before is None:
            continue
        cell = cells.get((run.setting, run.variant), [])
        row, inside = [run.name], []
        for inference in ("population", "batch"):
            seeds = final_top1s(cell, inference)
            old, new = (r.final("population" if r.variant == "gn" else inference) for r in (before, run))
            inside.append(bool(seeds) and new is not None and min(seeds) <= new <= max(seeds))
            row += [f"{old:.1f}", f"{new:.1f}", f"{min(seeds):.1f}-{max(seeds):.1f}" if seeds else "—"]
        seconds = [float(r.summary.get("wall_time_s") or 0) for r in (before, run)]
        wall_before, wall_after = wall_before + seconds[0], wall_after + seconds[1]
        row += ["yes" if all(inside) else "**no**", f"{seconds[0]:.0f}", f"{seconds[1]:.0f}",
                f"{seconds[1] / seconds[0]:.2f}" if seconds[0] else "—"]
        lines.append("| " + " | ".join(row) + " |")
    if wall_before:
        lines += ["", f"All runs: {wall_before / 60:.1f} min committed, {wall_after / 60:.1f} min rerun "
                      f"({wall_after / wall_before:.2f}x), summed over runs."]
    (out_dir / f"{experiment}_against_{original}.md").write_text("\n".join(lines) + "\n")


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


def write_readme_status(out_dir: Path, line: str) -> None:
    readme = out_dir / "README.md"
    rest = readme.read_text().splitlines() if readme.exists() else ["", "# The CPU study", ""]
    if rest and rest[0].startswith(README_STATUS_PREFIX):  # replaced; any other first line is kept
        rest = rest[1:]
    readme.write_text("\n".join([line, *rest]) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="default runs/study")
    parser.add_argument("--out-dir", type=Path, default=Path("results/study"), help="default results/study")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="skip what loads the trained networks (the Fig. 8 analogue, the prior fit)")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    records_dir = args.out_dir / "records"
    written = []
    for experiment in EXPERIMENTS:
        runs = load_runs(args.runs_dir, records_dir, experiment)
        if not runs:
            continue
        save_records(runs, records_dir)
        written.append(experiment)
        if experiment == "study_robustness":  # cells by model and learning rate, not by setting alone
            write_robustness(runs, args.out_dir)
            continue
        write_results_table(experiment, runs, args.out_dir)
        write_figure(experiment, runs, args.out_dir)
        if experiment in RERUNS:
            write_rerun(experiment, runs, load_runs(args.runs_dir, records_dir, RERUNS[experiment]), args.out_dir)
        if experiment in GRIDS:
            write_final_figure(experiment, runs, args.out_dir)
            baseline = baseline_top1(runs, GRIDS[experiment].baseline)
            if baseline is not None:
                write_steps_to_baseline(experiment, runs, baseline, args.out_dir)
            # The gaps of each run come from its record or, the first time, its checkpoint. Without
            # either (a fresh clone of the digits study) the committed Fig. 8 analogue stays as it is.
            measured = [run for run in runs if has_gaps(run, not args.no_checkpoints)]
            gaps = write_variance_gap(experiment, measured, args.out_dir) if measured else {}
            save_records(measured, records_dir)  # with the gaps measured just now
            if experiment in CLAIMS:
                write_claims(experiment, runs, baseline, gaps, args.out_dir)
        if experiment in PRIOR_FIT and not args.no_checkpoints:
            rows = prior_fit.summarize(with_checkpoints(runs), batches=4, device=torch.device("cpu"))
            if rows:
                prior_fit.write_markdown(rows, args.out_dir / PRIOR_FIT[experiment], "make study")
    if not args.no_checkpoints:  # before any training: what each kind of state predicts at initialization
        prior_fit.write_markdown(prior_fit.initial_rows(batches=4), args.out_dir / "prior_fit_initial.md",
                                 "make study (no runs needed)", "at initialization (seeds 0-2, before any step)")
    main_runs = load_runs(args.runs_dir, records_dir, "study")
    line = status_line(baseline_top1(main_runs, GRIDS["study"].baseline))
    line += fashion_status(load_runs(args.runs_dir, records_dir, "study_fashion"))
    times = wall_times(args.runs_dir, records_dir)
    if times:
        line += " Wall time per part (records/wall_times.jsonl): " + ", ".join(f"{part} {seconds / 60:.0f} min"
                                                                   for part, seconds in sorted(times.items())) + "."
    write_readme_status(args.out_dir, line)
    print(f"wrote {', '.join(written) or 'no tables (no runs yet)'} and the README status line to {args.out_dir}")
    print(line)


if __name__ == "__main__":
    main()
