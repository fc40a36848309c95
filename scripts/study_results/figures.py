"""The study's figures: per experiment top-1 against steps (``<experiment>.png``, a panel per setting
and inference option), and per grid every seed's final top-1 with the mean and its 95% interval,
zoomed to where the normalizers differ (``<files>_final.png``). Colours are plots.py's.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import plots
from run_records import Run

from .experiments import EXPERIMENTS, GRIDS, Setting
from .intervals import interval
from .measures import OPTIONS, final_top1s, rows_of
from .normalizers import label, per_example


def write_figure(experiment: str, runs: Sequence[Run], out_dir: Path) -> None:
    panels = []
    by_setting: dict[Setting, list[tuple[str, list[Run]]]] = defaultdict(list)
    for (setting, variant), group in rows_of(runs).items():
        by_setting[setting].append((variant, [run for run in group if run.finished]))
    for setting, rows in by_setting.items():
        for inference in ("population", "batch"):
            curves = [plots.Curve(label(variant), variant.split("-")[0], False, [run.curve(inference) for run in group],
                                  transition=variant.partition("-")[2] or None)
                      for variant, group in rows if not (inference == "batch" and per_example(variant))]
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
                            [label(variant).replace(" (", "\n(").replace(", ", ",\n") + (" = B" if per_example(variant) and option == "A" else "")
                             for variant in variants], fontsize=7)
            axis.set_title(f"setting ({setting[0]}, {setting[1]}), {plots.INFERENCE_TITLES[inference]}", fontsize=9)
            axis.set_ylabel("final top-1 (%)")
            axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{experiment}: final top-1, each seed (dots), mean (bar) and its 95% interval; each panel "
                    f"zoomed to {ZOOM_POINTS:g} points below its best mean (\u25bc: a mean below that)", fontsize=10)
    figure.savefig(out_dir / f"{GRIDS[experiment].files.format('final')}.png", dpi=110)
    plt.close(figure)
