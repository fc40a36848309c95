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

The parts live in the package scripts/study_results/ (tables, figures, the interval statistics,
claims, the Fig. 8 analogue, robustness, the status line); its docstring says where a new
normalizer or claim goes. This file runs them.

    python scripts/study_report.py                      # runs/study -> results/study
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

import prior_fit
from study_results.claims import write_claims
from study_results.experiments import EXPERIMENTS, GRIDS, PRIOR_FIT, REFERENCE_ACCURACIES, RERUNS
from study_results.figures import write_final_figure, write_figure
from study_results.measures import baseline_top1
from study_results.normalizers import UnknownNormalizer, normalizer_of
from study_results.records import load_runs, save_records, with_checkpoints
from study_results.robustness import write_robustness
from study_results.status import readme_status, write_readme_status
from study_results.tables import write_rerun, write_results_table, write_steps_to_baseline
from study_results.variance_gap import has_gaps, write_variance_gap


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="default runs/study")
    parser.add_argument("--out-dir", type=Path, default=Path("results/study"), help="default results/study")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="skip what loads the trained networks (the Fig. 8 analogue, the prior fit)")
    args = parser.parse_args(argv)
    try:
        write_report(args.runs_dir, args.out_dir, measure_checkpoints=not args.no_checkpoints)
    except UnknownNormalizer as error:  # a run of a normalizer the report has no row for: one line, the fix
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def write_report(runs_dir: Path, out_dir: Path, measure_checkpoints: bool) -> None:
    """Every table, figure and the README status line from the runs of ``runs_dir`` and the records
    under ``out_dir``; UnknownNormalizer, before anything is written, for a run of a normalizer that
    study_results/normalizers.py does not list."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records_dir = out_dir / "records"
    loaded = {experiment: load_runs(runs_dir, records_dir, experiment) for experiment in EXPERIMENTS}
    for run in (run for runs in loaded.values() for run in runs):  # every row's normalizer known, before any file
        normalizer_of(run.variant)
    written = []
    for experiment, runs in loaded.items():
        if not runs:
            continue
        save_records(runs, records_dir)
        written.append(experiment)
        if experiment == "study_robustness":  # cells by model and learning rate, not by setting alone
            write_robustness(runs, out_dir)
            continue
        write_results_table(experiment, runs, out_dir)
        write_figure(experiment, runs, out_dir)
        if experiment in RERUNS:
            write_rerun(experiment, runs, load_runs(runs_dir, records_dir, RERUNS[experiment]), out_dir)
        if experiment in GRIDS:
            write_final_figure(experiment, runs, out_dir)
            baseline = baseline_top1(runs, GRIDS[experiment].baseline)
            if baseline is not None:
                write_steps_to_baseline(experiment, runs, baseline, out_dir)
            # The gaps of each run come from its record or, the first time, its checkpoint. Without
            # either (a fresh clone of the digits study) the committed Fig. 8 analogue stays as it is.
            measured = [run for run in runs if has_gaps(run, measure_checkpoints)]
            gaps = write_variance_gap(experiment, measured, out_dir) if measured else {}
            save_records(measured, records_dir)  # with the gaps measured just now
            if experiment in REFERENCE_ACCURACIES:
                write_claims(experiment, runs, baseline, gaps, out_dir)
        if experiment in PRIOR_FIT and measure_checkpoints:
            rows = prior_fit.summarize(with_checkpoints(runs), batches=4, device=torch.device("cpu"))
            if rows:
                prior_fit.write_markdown(rows, out_dir / PRIOR_FIT[experiment], "make study")
    if measure_checkpoints:  # before any training: what each kind of state predicts at initialization
        prior_fit.write_markdown(prior_fit.initial_rows(batches=4), out_dir / "prior_fit_initial.md",
                                 "make study (no runs needed)", "at initialization (seeds 0-2, before any step)")
    line = readme_status(runs_dir, records_dir)
    write_readme_status(out_dir, line)
    print(f"wrote {', '.join(written) or 'no tables (no runs yet)'} and the README status line to {out_dir}")
    print(line)


if __name__ == "__main__":
    main()
