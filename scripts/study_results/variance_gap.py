"""The Fig. 8 analogue of the study's grids (``<files>_variance_gap.{md,png}``): per setting and
normalizer, how far the variance each trained network normalizes with lies from its moving variance
(scripts/fig8_statistics.py measures it), every seed with its mean and 95% interval. A run's
measurement is kept with its record (records.GAPS_FILE), so the checkpoint is needed once.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

import torch

from bkn.engine.checkpoint import checkpoint_path

from fig8_statistics import Gaps, measure, plot
from run_records import Run

from .experiments import GRIDS
from .intervals import interval
from .normalizers import label
from .records import GAPS_FILE

VarianceGaps = dict[str, tuple[float, float]]  # Fig. 8 analogue: a run's mean gap and mean gap / moving variance


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
