"""Turn run records (local folders, or W&B with ``--wandb``) into the paper's tables and figures.

For every table or figure id it writes, under ``results/<scale>/``, ``<id>.md`` and ``<id>.csv``
with OUR value (mean ± std over seeds of the runs that finished) beside the PAPER's value, and for
a figure also ``<id>.png`` (top-1 against step). The paper's numbers live in ``PAPER_REFERENCE``
and nowhere else; a run with no record shows as "missing", never as a number.

    python scripts/aggregate.py table1 fig3 --scale smoke            # reads runs/smoke/<experiment>/
    python scripts/aggregate.py all --scale paper --wandb me/bkn       # pulls the runs from W&B

Figure baselines ("BN at (256, 32)") are table1's BN runs, as in the paper: figures 3 and 5-7
compare against the very runs of Table 1. Fig. 8 needs the trained models: scripts/fig8_statistics.py.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import plots
from run_records import Run, load_local, load_wandb

# The paper's numbers (Wang et al. 2018, "Batch Kalman Normalization"), by table/figure id, then
# by row key, then by metric. Figures report some results only as gaps ("BKN +3.7 over BN"):
# those sit on comparison rows ("<model>/bkn-bn"). Every number here is shown labelled "paper".
PAPER_REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "table1": {  # Table 1: ImageNet, (256, 32) on 8 GPUs
        "inception_v2/bn": {"top1_population": 73.1, "steps_to_bn_top1": 170_000},
        "inception_v2/bkn": {"top1_population": 74.0, "steps_to_bn_top1": 100_000},
        "inception_v2/bkn/bn": {"steps_to_bn_top1": 100_000 / 170_000},  # "41.2% fewer steps"
        "resnet101/bn": {"top1_population": 77.4},
        "resnet101/bkn": {"top1_population": 78.3},
    },
    "table2": {  # Table 2: training speed on 4 Titan-X
        "inception_v2/bn": {"examples_per_s": 325.74},
        "inception_v2/bkn": {"examples_per_s": 320.94},
        "inception_v2/bkn/bn": {"examples_per_s": 320.94 / 325.74},
    },
    "fig3": {  # Fig. 3: (256, 4), baseline (256, 32)
        "inception_v2/bkn": {"top1_population": 70.04},
        "inception_v2/bkn-bn": {"top1_population": 3.7},
        "resnet101/bkn-bn": {"top1_population": 10.2},  # at a mid-training step the text does not name
        "inception_v2/baseline": {"top1_population": 73.1},
        "resnet101/baseline": {"top1_population": 77.4},
    },
    "fig4": {  # Fig. 4: (256, 1); option A = batch statistics, option B = population statistics
        "inception_v2/bkn": {"top1_batch": 47.99, "top1_population": 0.4},
        "inception_v2/bkn-bn": {"top1_batch": 2.11},
        "inception_v2/bkn-brn": {"top1_batch": 2.75},
    },
    "fig5": {  # Fig. 5: (64, 8), baseline (256, 32)
        "inception_v2/bn": {"top1_population": 63.66},
        "inception_v2/bkn": {"top1_population": 66.02},
        "resnet101/bkn-bn": {"top1_population": 7.81},
        "inception_v2/baseline": {"top1_population": 73.1},
        "resnet101/baseline": {"top1_population": 77.4},
    },
    "fig6": {  # Fig. 6: (16, 4)
        "inception_v2/bkn-bn": {"top1_population": 4.24},
        "resnet101/bkn-bn": {"top1_population": 4.79},
        "inception_v2/baseline": {"top1_population": 73.1},
        "resnet101/baseline": {"top1_population": 77.4},
    },
    "fig7": {  # Fig. 7: (8, 2); the text gives no number
        "inception_v2/baseline": {"top1_population": 73.1},
        "resnet101/baseline": {"top1_population": 77.4},
    },
    "table3": {  # Table 3: CIFAR net, micro-batch (statistics groups of 2) vs ordinary BN at 128
        "cifar10/bn": {"top1_batch": 90.0, "top1_population": 89.4, "num_parameters": 49e6},
        "cifar10/bkn": {"top1_batch": 90.9, "top1_population": 90.9, "num_parameters": 52e6},
        "cifar10/baseline": {"top1_batch": 92.1},
        "cifar10/bkn-bn": {"top1_population": 1.5},
        "cifar100/bn": {"top1_batch": 63.8, "top1_population": 63.1, "num_parameters": 49e6},
        "cifar100/bkn": {"top1_batch": 67.3, "num_parameters": 52e6},
        "cifar100/baseline": {"top1_batch": 70.5, "top1_population": 70.1},
        "cifar100/bkn-bn": {"top1_batch": 3.5},
    },
}


@dataclass(frozen=True)
class Metric:
    title: str
    digits: int
    scale: float = 1.0  # shown divided by this (parameters in millions)


METRICS = {
    "top1_population": Metric("top-1 % (population stats, option B)", 2),
    "top1_batch": Metric("top-1 % (batch stats, option A)", 2),
    "examples_per_s": Metric("examples/s", 2),
    "num_parameters": Metric("parameters (M)", 2, 1e6),
    "steps_to_bn_top1": Metric("steps to BN's final top-1", 0),
}


@dataclass(frozen=True)
class Row:
    """One line of a table: the runs it averages, and the key of its values in PAPER_REFERENCE."""

    key: str  # "inception_v2/bkn"
    label: str  # "InceptionV2 + BKN"
    experiment: str  # whose runs it reads: the figures' baselines read table1's
    match: Mapping[str, Any]  # run attributes (run_records.Run.attributes) its runs must have
    paper_setting: str  # "(256, 4)"
    baseline: bool = False  # drawn dashed in figures


@dataclass(frozen=True)
class Comparison:
    """A derived line, ``a - b`` or ``a / b`` of two rows' means, as the paper states its gaps."""

    key: str  # "inception_v2/bkn-bn"
    label: str
    a: str
    b: str
    ratio: bool = False
    metrics: tuple[str, ...] = ("top1_population", "top1_batch")


@dataclass(frozen=True)
class Layout:
    title: str
    rows: tuple[Row, ...]
    metrics: tuple[str, ...]
    comparisons: tuple[Comparison, ...] = ()
    notes: tuple[str, ...] = ()  # the paper's claims that carry no number
    curves: tuple[str, ...] = ()  # inference options drawn as top-1-vs-step panels; () = no figure


MODEL_NAMES = {"inception_v2": "InceptionV2", "resnet101": "ResNet101", "cifar_net": "CIFAR net"}
NORMALIZER_NAMES = {"bn": "BN", "brn": "BRN", "bkn": "BKN", "gn": "GN (ours, not in the paper)",
                    "frn": "FRN + TLU (not in the paper)", "evonorm_s0": "EvoNorm-S0 (not in the paper)",
                    "cbn": "CBN (not in the paper)"}
IMAGENET_MODELS = ("inception_v2", "resnet101")
ALL_NORMALIZERS = ("bn", "brn", "bkn", "gn")  # figures 3-7; GN is our addition, so it has no paper values
# GN's statistics are per example: its option A (batch statistics) is its option B.
SAME_AS_POPULATION = "= option B (GN: per-example statistics)"


def _rows(experiment: str, models: Sequence[str], normalizers: Sequence[str], paper_setting: str) -> tuple[Row, ...]:
    return tuple(Row(f"{model}/{norm}", f"{MODEL_NAMES[model]} + {NORMALIZER_NAMES[norm]}", experiment,
                     {"model": model, "normalizer": norm}, paper_setting)
                 for model in models for norm in normalizers)


def _baselines(models: Sequence[str]) -> tuple[Row, ...]:
    return tuple(Row(f"{model}/baseline", f"{MODEL_NAMES[model]} + BN baseline (Table 1's runs)", "table1",
                     {"model": model, "normalizer": "bn"}, "(256, 32)", baseline=True) for model in models)


def _gaps(models: Sequence[str], others: Sequence[str] = ("bn",), **options: Any) -> tuple[Comparison, ...]:
    return tuple(Comparison(f"{model}/bkn-{other}", f"{MODEL_NAMES[model]}: BKN - {NORMALIZER_NAMES[other]}",
                            f"{model}/bkn", f"{model}/{other}", **options) for model in models for other in others)


def _micro_figure(figure: str, setting: str, notes: tuple[str, ...] = ()) -> Layout:
    return Layout(f"ImageNet, setting {setting} against the (256, 32) baseline",
                  _rows(figure, IMAGENET_MODELS, ALL_NORMALIZERS, setting) + _baselines(IMAGENET_MODELS),
                  ("top1_population",), _gaps(IMAGENET_MODELS), notes, curves=("population",))


def _table3_rows() -> tuple[Row, ...]:
    rows = []
    for data, classes in (("cifar10", 10), ("cifar100", 100)):
        micro = {"classes": classes, "whole_device_batch": False, "width": 1.0}
        rows += [
            Row(f"{data}/bn", f"{data}: BN", "table3", {**micro, "normalizer": "bn"}, "(128, 2)"),
            Row(f"{data}/bkn", f"{data}: BKN", "table3", {**micro, "normalizer": "bkn"}, "(128, 2)"),
            Row(f"{data}/bn_widened", f"{data}: BN widened to BKN's parameters", "table3",
                {**micro, "normalizer": "bn", "width": "widened"}, "(128, 2)"),
            Row(f"{data}/baseline", f"{data}: BN baseline, whole batch", "table3",
                {"classes": classes, "whole_device_batch": True, "normalizer": "bn", "width": 1.0},
                "(128, 128)", baseline=True),
        ]
    return tuple(rows)


LAYOUTS: dict[str, Layout] = {
    "table1": Layout(
        "ImageNet, moderate batch (256, 32): top-1 and steps to reach BN's final top-1",
        _rows("table1", IMAGENET_MODELS, ("bn", "bkn"), "(256, 32)"), ("top1_population", "steps_to_bn_top1"),
        _gaps(IMAGENET_MODELS, metrics=("top1_population",))
        + (Comparison("inception_v2/bkn/bn", "InceptionV2: BKN / BN steps", "inception_v2/bkn", "inception_v2/bn",
                      ratio=True, metrics=("steps_to_bn_top1",)),),
        ("Paper: Inception+BKN needs 41.2% fewer steps than Inception+BN to reach 73.1%.",)),
    "table2": Layout(
        "Training speed, InceptionV2 at (256, 32)", _rows("table2", ("inception_v2",), ("bn", "bkn"), "(256, 32)"),
        ("examples_per_s",),
        (Comparison("inception_v2/bkn/bn", "InceptionV2: BKN / BN", "inception_v2/bkn", "inception_v2/bn",
                    ratio=True, metrics=("examples_per_s",)),),
        ("Paper: measured on one desktop with 4 Titan-X GPUs; BKN is about 1.5% slower than BN. "
         "Ours: mean examples/s of each training run (data loading and evaluation excluded as train.py "
         "measures it); see results/benchmark/ for the dedicated benchmark.",)),
    "fig3": _micro_figure("fig3", "(256, 4)", (
        "Paper: ResNet101's +10.2 gap is read at a mid-training step the text does not name; ours is at the end.",)),
    "fig4": Layout(
        "ImageNet, one example per statistics group (256, 1): inference with batch (A) vs population (B) statistics",
        _rows("fig4", ("inception_v2",), ALL_NORMALIZERS, "(256, 1)"), ("top1_batch", "top1_population"),
        _gaps(("inception_v2",), ("bn", "brn")),
        ("Paper: all methods fail under option B, since moving averages of one-example statistics "
         "do not estimate the population statistics.",), curves=("batch", "population")),
    "fig5": _micro_figure("fig5", "(64, 8)"),
    "fig6": _micro_figure("fig6", "(16, 4)"),
    "fig7": _micro_figure("fig7", "(8, 2)", (
        "Paper: BKN converges faster than BN and BRN; all methods stay well below the (256, 32) baseline.",)),
    "table3": Layout(
        "CIFAR net on CIFAR-10 / CIFAR-100: micro-batch against ordinary BN at batch 128",
        _table3_rows(), ("top1_batch", "top1_population", "num_parameters"),
        tuple(Comparison(f"{data}/bkn-bn", f"{data}: BKN - BN", f"{data}/bkn", f"{data}/bn")
              for data in ("cifar10", "cifar100")),
        ("Paper: the network is 49M parameters with BN, 52M with BKN (ours is far smaller: the "
         "counts above are our real ones); widening BN to BKN's parameter count gives no gain.",
         "At scale smoke, 'cifar10' / 'cifar100' are synthetic data with 10 / 100 classes.")),
}


@dataclass
class Cell:
    """Our value for one (row, metric): mean ± std over finished seeds, or why there is none."""

    values: list[float] = field(default_factory=list)
    missing: str = "missing"  # shown when there are no values: "missing", or the runs' statuses
    diverged: int = 0  # seeds whose run diverged: never values, always shown
    not_learned: int = 0  # finished seeds whose run did not learn (at chance, loss not falling): shown

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def matches(run: Run, match: Mapping[str, Any]) -> bool:
    attributes = run.attributes()
    for name, wanted in match.items():
        if wanted == "widened":  # any width above the plain network's
            if not attributes[name] > 1.0:
                return False
        elif attributes.get(name) != wanted:
            return False
    return True


def _run_value(run: Run, metric: str, bn_top1: float | None) -> float | None:
    if metric.startswith("top1_"):
        return run.final(metric.removeprefix("top1_"))
    if metric == "steps_to_bn_top1":
        step = None if bn_top1 is None else run.first_reach("population", bn_top1)
        return None if step is None else float(step)
    value = run.summary.get(metric)
    return None if value is None else float(value)


def row_cells(layout: Layout, runs_by_row: Mapping[str, list[Run]]) -> dict[tuple[str, str], Cell]:
    """Our cells for every (row key, metric) of ``layout``."""
    cells: dict[tuple[str, str], Cell] = {}
    for row in layout.rows:
        runs = runs_by_row[row.key]
        finished = [run for run in runs if run.finished]
        missing = "missing" if not runs else "/".join(sorted({run.status for run in runs}))
        # Steps to reach BN's final top-1: BN's is the same model's BN row (Table 1).
        bn_finals = [top1 for run in runs_by_row.get(row.key.split("/")[0] + "/bn", [])
                     if run.finished and (top1 := run.final("population")) is not None]
        bn_top1 = statistics.fmean(bn_finals) if bn_finals else None
        for metric in layout.metrics:
            if metric == "top1_batch" and row.match.get("normalizer") == "gn":
                cells[row.key, metric] = Cell(missing=SAME_AS_POPULATION)
                continue
            values = [value for run in finished if (value := _run_value(run, metric, bn_top1)) is not None]
            unfilled = "not reached" if metric == "steps_to_bn_top1" else "not recorded"
            diverged = sum(run.status == "diverged" for run in runs) if finished else 0
            not_learned = sum(not run.learned for run in finished)
            cells[row.key, metric] = Cell(values, missing if not finished else unfilled, diverged, not_learned)
    for comparison in layout.comparisons:
        for metric in comparison.metrics:
            if metric not in layout.metrics:
                continue
            a, b = cells[comparison.a, metric].mean, cells[comparison.b, metric].mean
            value = None if a is None or b is None else (a / b if comparison.ratio else a - b)
            cells[comparison.key, metric] = Cell([] if value is None else [value])
    return cells


def _format(value: float | None, metric: str, ratio: bool = False) -> str:
    if value is None:
        return ""
    spec = METRICS[metric]
    if ratio:
        return f"{value:.3f}"
    return f"{value / spec.scale:.{spec.digits}f}"


def _format_cell(cell: Cell, metric: str, ratio: bool = False) -> str:
    if cell.mean is None:
        return cell.missing
    text = _format(cell.mean, metric, ratio)
    if cell.std is not None:
        text += f" ± {_format(cell.std, metric, ratio)} (n={len(cell.values)})"
    return (text + (f", {cell.diverged} diverged" if cell.diverged else "")
            + (f", {cell.not_learned} did not learn" if cell.not_learned else ""))


def _paper(experiment: str, key: str, metric: str) -> float | None:
    return PAPER_REFERENCE.get(experiment, {}).get(key, {}).get(metric)


def _settings(runs: list[Run]) -> str:
    return ", ".join(f"({g}, {s})" for g, s in sorted({run.setting for run in runs})) or "—"


def _data(runs_by_row: Mapping[str, list[Run]]) -> str:
    """The data sets (with their folders) that the table's runs read."""
    sources = sorted({run.data for runs in runs_by_row.values() for run in runs})
    return ", ".join(f"`{source}`" for source in sources) or "no runs yet"


SMOKE_WARNING = ("Scale **smoke**: the same code path shrunk to minutes on a CPU (small or synthetic data, "
                 "small images, few steps, small batches). Its numbers only show that the pipeline runs; "
                 "they are not the paper's experiment and must not be compared with the paper's numbers.")


def write_table(experiment: str, layout: Layout, runs: list[Run], scale: str, out_dir: Path,
                command: str) -> dict[str, list[Run]]:
    """Write ``<experiment>.md`` and ``<experiment>.csv``; return the runs of each row.

    A layout without paper values gets no paper columns."""
    runs_by_row = {row.key: [run for run in runs if run.experiment == row.experiment and matches(run, row.match)]
                   for row in layout.rows}
    cells = row_cells(layout, runs_by_row)
    with_paper = experiment in PAPER_REFERENCE
    lines = [(row.key, row.label, _settings(runs_by_row[row.key]), row.paper_setting, False) for row in layout.rows]
    lines += [(c.key, c.label, "", "", c.ratio) for c in layout.comparisons]
    metric_of = {c.key: set(c.metrics) for c in layout.comparisons}

    header = ["row", "setting (ours)"] + (["setting (paper)"] if with_paper else [])
    for metric in layout.metrics:
        header += [f"{METRICS[metric].title} — ours"] + ([f"{METRICS[metric].title} — paper"] if with_paper else [])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    records = []
    for key, label, ours_setting, paper_setting, ratio in lines:
        texts = [label, ours_setting] + ([paper_setting] if with_paper else [])
        for metric in layout.metrics:
            cell, paper = cells.get((key, metric)), _paper(experiment, key, metric)
            shown = key not in metric_of or metric in metric_of[key]
            texts.append(_format_cell(cell, metric, ratio) if cell and shown else "")
            if with_paper:
                texts.append((_format(paper, metric, ratio) or "—") if shown else "")
            if cell is not None:
                records.append({"experiment": experiment, "scale": scale, "row": key, "label": label,
                                "setting_ours": ours_setting, "setting_paper": paper_setting, "metric": metric,
                                "ours_mean": cell.mean, "ours_std": cell.std, "ours_seeds": len(cell.values),
                                "ours_status": "ok" if cell.mean is not None else cell.missing, "paper": paper})
        table.append("| " + " | ".join(texts) + " |")

    text = [f"# {experiment} — {layout.title}", ""]
    if scale == "smoke":
        text += [SMOKE_WARNING, ""]
    text += ["Ours: mean ± std over the seeds whose run finished (n = seeds); `missing`: no run record; "
             "a run status (`running`, `failed`, `preempted`, `diverged`): no finished run; `k diverged`: "
             "seeds left out of the mean because their run diverged; `k did not learn`: finished seeds (in the "
             "mean) whose training loss did not fall or whose top-1 is at chance."
             + (" Paper: the paper's own number (— where it gives none)." if with_paper else ""), "",
             f"Data (ours): {_data(runs_by_row)}.", "", *table, ""]
    text += [f"- {note}" for note in layout.notes]
    text += ["", f"Regenerate: `{command}`"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{experiment}.md").write_text("\n".join(text).rstrip() + "\n")
    with open(out_dir / f"{experiment}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]) if records else ["experiment"])
        writer.writeheader()
        writer.writerows(records)
    return runs_by_row


def _curve_label(label: str, runs: list[Run]) -> str:
    """A figure shows no diverged run's curve; its legend says how many there were."""
    diverged = sum(run.status == "diverged" for run in runs)
    return f"{label} ({diverged} diverged)" if diverged else label


def write_figure(experiment: str, layout: Layout, runs_by_row: Mapping[str, list[Run]], scale: str,
                 out_dir: Path) -> None:
    """Write ``<experiment>.png``: one panel per model and inference option, one curve per row."""
    panels = []
    for model in dict.fromkeys(row.match["model"] for row in layout.rows):
        rows = [row for row in layout.rows if row.match["model"] == model]
        keys = {row.key for row in rows}
        for inference in layout.curves:
            metric = f"top1_{inference}"
            curves = [plots.Curve(_curve_label(row.label, runs_by_row[row.key]), row.match["normalizer"], row.baseline,
                                  [run.curve(inference) for run in runs_by_row[row.key] if run.status != "diverged"],
                                  _paper(experiment, row.key, metric), row.match.get("transition"))
                      for row in rows]
            claims = [f"{c.label}: {paper:+.2f}" for c in layout.comparisons
                      if c.a in keys and (paper := _paper(experiment, c.key, metric)) is not None]
            title = f"{MODEL_NAMES.get(model, model)}, {plots.INFERENCE_TITLES[inference]}"
            panels.append(plots.Panel(title, curves, claims))
    suffix = f" (scale {scale})"
    columns = len(layout.curves) if len(layout.curves) > 1 else len(panels)
    plots.plot_panels(panels, f"{experiment}: {layout.title}{suffix}", out_dir / f"{experiment}.png", columns)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="+", help=f"table/figure ids ({', '.join(LAYOUTS)}) or 'all'")
    parser.add_argument("--scale", default="smoke", help="which scale's runs (default smoke); names the output folder")
    parser.add_argument("--runs-dir", type=Path, help="folder of run records (default runs/<scale>)")
    parser.add_argument("--out-dir", type=Path, help="where to write (default results/<scale>)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="pull the runs from this W&B project instead")
    args = parser.parse_args(argv)
    ids = list(LAYOUTS) if args.ids == ["all"] else args.ids
    unknown = [i for i in ids if i not in LAYOUTS]
    if unknown:
        parser.error(f"unknown id {unknown[0]!r}; choose from {', '.join(LAYOUTS)}, all "
                     "(fig8 is drawn by scripts/fig8_statistics.py, the CPU study by scripts/study_report.py)")
    runs_dir = args.runs_dir or Path("runs") / args.scale
    out_dir = args.out_dir or Path("results") / args.scale
    experiments = sorted({row.experiment for i in ids for row in LAYOUTS[i].rows})
    runs = load_wandb(args.wandb, experiments) if args.wandb else load_local(runs_dir, experiments)
    for experiment in ids:
        layout, command = LAYOUTS[experiment], f"make {experiment} SCALE={args.scale}"
        runs_by_row = write_table(experiment, layout, runs, args.scale, out_dir, command)
        if layout.curves:
            write_figure(experiment, layout, runs_by_row, args.scale, out_dir)
        print(f"wrote {out_dir / experiment}.{{md,csv{',png' if layout.curves else ''}}}")


if __name__ == "__main__":
    main()
