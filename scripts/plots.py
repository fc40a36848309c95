"""Draw top-1-against-step figures: one panel per model (or setting), one curve per normalizer.

Plain data in, PNG out: ``aggregate.py`` picks the runs and the paper's numbers, this file only
draws. Every figure uses the same colour for the same normalizer; baselines are dashed; the
paper's reported end points are stars at the right edge, labelled with their value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"bn": "tab:blue", "brn": "tab:orange", "bkn": "tab:green", "gn": "tab:purple", "frn": "tab:brown",
          "evonorm_s0": "tab:pink", "cbn": "tab:cyan"}
# BKN's transitions, for the study that compares them: shades of BKN's green.
TRANSITION_COLORS = {"analytic": "tab:green", "monte_carlo": "darkgreen", "linear": "yellowgreen",
                     "linear-no_propagation": "olive", "linear-learned_gain": "lime",
                     "analytic-state_input": "tab:red", "monte_carlo-state_input": "darkred"}
INFERENCE_TITLES = {"population": "population statistics (option B)", "batch": "batch statistics (option A)"}


def color(normalizer: str, transition: str | None = None) -> str:
    if normalizer == "bkn" and transition in TRANSITION_COLORS:
        return TRANSITION_COLORS[transition]
    return COLORS.get(normalizer, "tab:gray")


@dataclass
class Curve:
    """One row of a figure: the ``(step, top-1)`` points of each seed, and the paper's end value."""

    label: str
    normalizer: str
    baseline: bool
    seeds: list[list[tuple[int, float]]]
    paper: float | None = None
    transition: str | None = None


@dataclass
class Panel:
    title: str
    curves: list[Curve]
    claims: list[str] = field(default_factory=list)  # the paper's gaps, written in a corner


def mean_and_range(seeds: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps evaluated in every seed, with the seeds' mean, minimum and maximum there."""
    seeds = [dict(points) for points in seeds if points]
    if not seeds:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(points) for points in seeds)))
    values = [[points[step] for points in seeds] for step in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _draw(axis: plt.Axes, panel: Panel) -> None:
    last_step = max((step for curve in panel.curves for seed in curve.seeds for step, _ in seed), default=1)
    for curve in panel.curves:
        style = {"color": color(curve.normalizer, curve.transition), "linestyle": "--" if curve.baseline else "-"}
        steps, mean, low, high = mean_and_range(curve.seeds)
        seeds = sum(1 for seed in curve.seeds if seed)
        if steps:
            label = curve.label + (f" ({seeds} seeds)" if seeds > 1 else "")
            axis.plot(steps, mean, marker="." if len(steps) < 30 else None, label=label, **style)
            if seeds > 1:
                axis.fill_between(steps, low, high, color=style["color"], alpha=0.15, linewidth=0)
        else:
            axis.plot([], [], label=f"{curve.label}: missing", color="lightgray", linestyle=":")
        if curve.paper is not None:
            axis.plot([last_step], [curve.paper], marker="*", markersize=13, color=style["color"],
                      markeredgecolor="black", linestyle="none")
            name = curve.normalizer.upper() + (" baseline" if curve.baseline else "")
            axis.annotate(f"paper {name}: {curve.paper:g}", (last_step, curve.paper), textcoords="offset points",
                          xytext=(-8, 6), ha="right", fontsize=8, color=style["color"])
    if any(curve.paper is not None for curve in panel.curves):
        axis.plot([], [], marker="*", markersize=11, color="white", markeredgecolor="black", linestyle="none",
                  label="paper's reported value (its own step count)")
    if panel.claims:
        axis.text(0.98, 0.98, "paper:\n" + "\n".join(panel.claims), transform=axis.transAxes, ha="right",
                  va="top", fontsize=8, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    axis.set_title(panel.title, fontsize=10)
    axis.set_xlabel("training step (optimizer updates)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:  # a panel of a grid still running may have no curve yet
        axis.legend(fontsize=7, loc="upper left")


def plot_panels(panels: Sequence[Panel], title: str, path: Path, columns: int) -> None:
    """Draw ``panels`` in a grid of ``columns`` and save the figure to ``path``."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 4.6 * rows), squeeze=False,
                                layout="constrained")
    for axis, panel in zip(axes.flat, panels):
        _draw(axis, panel)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    several_seeds = any(sum(1 for seed in curve.seeds if seed) > 1 for panel in panels for curve in panel.curves)
    figure.suptitle(title + ("\nlines: mean over seeds; bands: their minimum to maximum" if several_seeds else ""),
                    fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
