"""The robustness check (``study_robustness.{md,csv,png}``): the default command's recipe over
learning rates, per model and setting; the largest learning rate each normalizer trains at, and
whether the default BKN keeps up with BN wherever BN trains.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import plots
from run_records import Run

from .experiments import EXPERIMENTS, Setting
from .intervals import mean_present
from .measures import best_top1
from .normalizers import DEFAULT_BKN, label, per_example, variant_key

# A run "trains" when its better inference option reaches TRAINS_TOP1; the default BKN must then be
# within DEFAULT_MARGIN points of BN's better option wherever BN trains.
TRAINS_TOP1, DEFAULT_MARGIN = 90.0, 2.0


def robustness_cells(runs: Sequence[Run]) -> dict[tuple[str, Setting, float, str], list[Run]]:
    """Finished runs by (model, setting, learning rate, variant)."""
    cells: dict[tuple[str, Setting, float, str], list[Run]] = defaultdict(list)
    for run in runs:
        if run.finished:
            lr = float((run.config.get("optim") or {})["lr"])
            cells[str(run.summary["model"]), run.setting, lr, run.variant].append(run)
    return cells


def best_mean(runs: Sequence[Run]) -> float | None:
    """The mean over the runs of each one's better inference option (None: none has a top-1)."""
    return mean_present([best_top1(run) for run in runs])


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
                population = mean_present([run.final("population") for run in group])
                batch = mean_present([run.final("batch") for run in group])
                text = "—" if population is None else f"{population:.1f}"
                if not per_example(variant) and batch is not None:
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
                       and (top1 := best_mean(group)) is not None and top1 >= TRAINS_TOP1]
            texts.append(f"{max(trained):g}" if trained else "none")
        lines.append(f"| {model} | ({setting[0]}, {setting[1]}) | " + " | ".join(texts) + " |")
    lines += ["", f"## The default BKN ({label(DEFAULT_BKN)}) where BN trains", "",
              f"Every cell where BN's better option reaches {TRAINS_TOP1:.0f}%: the default BKN's better option "
              f"must be within {DEFAULT_MARGIN:.0f} points of it.", "",
              "| model | setting | lr | BN (better option) | default BKN (better option) | within 2 points |",
              "|---|---|---:|---:|---:|---|"]
    for row in rows:
        bn, bkn = best_mean(cells.get((*row, "bn"), [])), best_mean(cells.get((*row, DEFAULT_BKN), []))
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
                            and (top1 := best_mean(group)) is not None)
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
