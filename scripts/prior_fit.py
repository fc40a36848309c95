"""How well BKN's prediction fits what each layer then observes, in trained networks.

BKN normalizes with ``(1 - q) prior + q observation``; with the micro-batch gain (q = 0.1) the
prior carries 90% of the weight, so a prior that is off by a factor puts the normalized activations
off by about the same factor. For every finished BKN run in the run records this loads the final
checkpoint, runs test batches through it in training-style grouping (inference option A) and, at
every BKN layer that receives a prior, compares the prior's variance with the variance observed in
the same statistics group: the ratio ``prior variance / observed variance`` per group and channel.
It reports, per (setting, BKN variant), the median ratio over layers (each layer's median over
groups and channels, then the median over seeds) and how many layers have a median ratio outside
[1/2, 2]. It never trains.

    python scripts/prior_fit.py --runs-dir runs/study --experiment study --out results/study/prior_fit.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ is not a package
from fig8_statistics import build_trained_model  # noqa: E402
from run_records import Run, load_local  # noqa: E402

from bkn.data import build_datasets  # noqa: E402
from bkn.engine.evaluate import whole_groups  # noqa: E402
from bkn.functional import group_stats  # noqa: E402
from bkn.models import build_model  # noqa: E402
from bkn.nn import KalmanNorm2d, set_inference  # noqa: E402

FAR = 2.0  # a layer's prior counts as far off when its median ratio is beyond FAR or below 1 / FAR


def layer_ratios(run: Run, batches: int, device: torch.device) -> list[float]:
    """Median ``prior variance / observed variance`` of each BKN layer that gets a prior in ``run``'s
    trained network, over ``batches`` test batches; in network order."""
    model, loader, statistics_batch_size = build_trained_model(run, device)
    return model_ratios(model, loader, statistics_batch_size, batches, device)


@torch.no_grad()
def model_ratios(model: nn.Module, loader: Iterable, statistics_batch_size: int, batches: int,
                 device: torch.device) -> list[float]:
    """:func:`layer_ratios` for any BKN network, with inference option A (the training grouping)."""
    set_inference(model, "batch")
    ratios: dict[str, list[Tensor]] = defaultdict(list)

    def recorder(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            prior = args[1] if len(args) > 1 else None
            if prior is not None:
                _, observed = group_stats(args[0].float(), statistics_batch_size)
                ratios[name].append((prior.var / (observed + module.eps)).flatten())
        return record

    handles = [module.register_forward_pre_hook(recorder(name)) for name, module in model.named_modules()
               if isinstance(module, KalmanNorm2d)]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the Monte-Carlo transition samples: the same numbers on every call
            for index, (images, labels) in enumerate(loader):
                if index == batches:
                    break
                images, _ = whole_groups(images, labels, statistics_batch_size)
                if len(images):
                    model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(values).median().item() for values in ratios.values()]


def initial_rows(batches: int, seeds: Sequence[int] = (0, 1, 2), statistics_batch_size: int = 1) -> list[dict]:
    """The same statistics before any training: the study's network (preact_resnet32 on digits,
    initialized as train.py does for each seed) with BKN passing on its input's or its output's
    statistics, in training mode as the first step sees it (the throwaway model's running
    statistics move; nothing reads them). No run records needed."""
    test = build_datasets("digits").test
    loader = DataLoader(test, batch_size=32, shuffle=False)
    groups: dict[tuple, list[list[float]]] = defaultdict(list)
    for transition in ("analytic", "monte_carlo"):
        for state_from in ("input", "output"):
            norm = {"name": "bkn", "statistics_batch_size": statistics_batch_size, "transition": transition,
                    "gain": 0.1, "gain_warmup": 0, "state_from": state_from}  # the gain q itself, not BN's start
            for seed in seeds:
                torch.manual_seed(seed)  # train.py's initialization of seed `seed`
                model = build_model("preact_resnet32", 10, norm, 8, in_channels=1)
                variant = f"bkn-{transition}" + ("-state_input" if state_from == "input" else "")
                groups[(32, statistics_batch_size), variant].append(
                    model_ratios(model, loader, statistics_batch_size, batches, torch.device("cpu")))
    return _rows(groups)


def summarize(runs: Sequence[Run], batches: int, device: torch.device) -> list[dict]:
    """One row per (setting, BKN variant): the median over seeds of each run's statistics."""
    groups: dict[tuple, list[list[float]]] = defaultdict(list)
    for run in runs:
        if run.finished and run.summary.get("normalizer") == "bkn":
            groups[run.setting, run.variant].append(layer_ratios(run, batches, device))
    return _rows(groups)


def _rows(groups: dict[tuple, list[list[float]]]) -> list[dict]:
    rows = []
    for (setting, variant), per_seed in sorted(groups.items(), key=lambda item: (-item[0][0][0], item[0][1])):
        rows.append({
            "setting": setting, "variant": variant, "seeds": len(per_seed), "layers": len(per_seed[0]),
            "median": statistics.median(statistics.median(ratios) for ratios in per_seed),
            "lowest": statistics.median(min(ratios) for ratios in per_seed),
            "highest": statistics.median(max(ratios) for ratios in per_seed),
            "far": statistics.median(sum(not 1 / FAR <= r <= FAR for r in ratios) for ratios in per_seed),
        })
    return rows


def write_markdown(rows: list[dict], path: Path, command: str, when: str = "in trained networks") -> None:
    lines = [f"# BKN's prior against its observation, {when}", "",
             "Per BKN layer that receives a prior: the median over test statistics groups and channels of "
             "`prior variance / observed variance` (1 = the prediction matches the observation). Each "
             "column is the median over seeds of that statistic across the network's layers.", "",
             "| setting | BKN variant | seeds | layers | median ratio | lowest layer | highest layer "
             f"| layers beyond {FAR:g}x either way |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| ({row['setting'][0]}, {row['setting'][1]}) | {row['variant']} | {row['seeds']} "
                     f"| {row['layers']} | {row['median']:.3g} | {row['lowest']:.3g} | {row['highest']:.3g} "
                     f"| {row['far']:g} |")
    lines += ["", f"Regenerate: `{command}`"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="default runs/study")
    parser.add_argument("--experiment", default="study", help="the experiment's runs to read (default study)")
    parser.add_argument("--out", type=Path, default=Path("results/study/prior_fit.md"),
                        help="default results/study/prior_fit.md")
    parser.add_argument("--batches", type=int, default=4, help="test batches per run (default 4)")
    args = parser.parse_args(argv)
    runs = load_local(args.runs_dir, [args.experiment])
    rows = summarize(runs, args.batches, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not rows:
        sys.exit(f"error: no finished BKN run under {args.runs_dir / args.experiment}; run them first (make study)")
    command = "python scripts/prior_fit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(rows, args.out, command.strip())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
