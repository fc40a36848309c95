"""The study's markdown and CSV tables: per experiment its results table (``<experiment>.{md,csv}``),
per grid its steps to the baseline (``<files>_steps_to_baseline.md``), and a rerun set beside the
runs it repeats (``<rerun>_against_<experiment>.md``).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Sequence

from run_records import Run

from .experiments import DIGITS_TEST, EXPERIMENTS, GRIDS, PAPER_SPEED_CLAIM, REACH_FRACTION, RERUNS, TEST_SETS
from .intervals import interval_text, mean_std
from .measures import FLAT_ABSOLUTE, FLAT_TOLERANCE, final_loss, final_top1s, loss_is_flat, rows_of, steps_to_reach
from .normalizers import inference_of, label, per_example, per_example_clause, variant_key


def write_results_table(experiment: str, runs: Sequence[Run], out_dir: Path) -> None:
    test_images, whole_groups = TEST_SETS.get(experiment, DIGITS_TEST)
    header = ("| setting | normalizer | seeds | top-1 % B: population | B: 95% interval | top-1 % A: batch "
              "| A: 95% interval | final training loss | loss flat | not finished |")
    lines = [f"# {experiment} — {EXPERIMENTS[experiment]}", "",
             f"Mean ± std over the finished seeds, and the mean's 95% confidence interval (Student's t with "
             f"n - 1 degrees of freedom, not clipped to 0-100; — with one seed). Top-1 on {test_images} after "
             "the last step; B: "
             "population (running) statistics, the paper's option B; A: each test statistics group's own "
             f"statistics, option A, on whole groups only ({whole_groups}; {per_example_clause()}). "
             "Final training loss: "
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
        batch_cells = ["= B", "= B"] if per_example(variant) else [mean_std(batch, 1), interval_text(batch, 1)]
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
            if inference == "batch" and per_example(variant):
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
            old, new = (r.final(inference_of(r.variant, inference)) for r in (before, run))
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
