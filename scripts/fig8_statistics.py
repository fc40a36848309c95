"""Figure 8: how far each test batch's variance lies from the moving variance, BN against BKN.

For the BN and the BKN run of experiment fig8 it loads the final checkpoint, runs test batches
through the network with the paper's inference option A (each statistics group of the test batch
normalized with its own statistics, as in training) and hooks one normalization layer. For every
statistics group ("batch", the columns) and channel (the rows) it records the variance the layer
normalizes with — BN: the group's sample variance; BKN: its Kalman estimate — and draws
``|that variance - the layer's moving variance|`` as a heat map, one colour scale for both
(the paper: BKN's gaps are smaller). It also reports the gap of the raw sample variance, which
is the same for BN and differs for BKN. It never trains.

    python scripts/fig8_statistics.py --scale smoke     # runs/smoke/fig8 -> results/smoke/fig8.{png,md,csv}
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bkn.config import model_options, validate  # noqa: E402
from bkn.engine.checkpoint import checkpoint_path, load_checkpoint  # noqa: E402
from bkn.engine.session import load_datasets, normalizer_spec  # noqa: E402
from bkn.functional import group_stats  # noqa: E402
from bkn.models import build_model  # noqa: E402
from bkn.nn import ConvNormAct, KalmanNorm2d, set_inference  # noqa: E402
from run_records import Run, load_local  # noqa: E402

NORMALIZERS = ("bn", "bkn")
PAPER_CLAIM = "BKN's gaps are smaller than BN's (Fig. 8 a vs b; no number given)"


@dataclass
class Gaps:
    """One run's gaps at one layer, ``(channels, batches)``, with what produced them."""

    run: Run
    layer: str
    normalizing: Tensor  # |variance the layer normalizes with - moving variance|
    sample: Tensor  # |sample variance of the group - moving variance|
    moving: Tensor  # the moving variance, (channels,)


def default_layer(model: nn.Module) -> str:
    """The deepest normalization layer after a spatial (k x k, k > 1) convolution: there BKN's
    estimate has come through the most layers, and its prediction through a real spatial conv."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, ConvNormAct) and max(module.conv.kernel_size) > 1]
    if not names:
        raise ValueError("the model has no normalization layer after a k x k convolution; pass --layer")
    return f"{names[-1]}.norm"


def build_trained_model(run: Run, device: torch.device) -> tuple[nn.Module, DataLoader, int]:
    """The run's network with its final weights, a test loader, and its statistics batch size."""
    cfg = OmegaConf.create(run.config)
    plan = validate(cfg)
    datasets = load_datasets(cfg, plan)
    model = build_model(cfg.model.name, datasets.num_classes, normalizer_spec(cfg, plan), plan.image_size,
                        in_channels=datasets.channels, **model_options(cfg))
    model.load_state_dict(load_checkpoint(checkpoint_path(run.directory))["model"])
    loader = DataLoader(datasets.test, batch_size=plan.eval_batch_size, shuffle=False)
    return model.to(device).eval(), loader, plan.statistics_batch_size


@torch.no_grad()
def measure(run: Run, layer: str | None, batches: int, device: torch.device) -> Gaps:
    """Run test data through ``run``'s trained network until ``batches`` statistics groups are seen."""
    model, loader, statistics = build_trained_model(run, device)
    layer = layer or default_layer(model)
    norm = model.get_submodule(layer)
    set_inference(model, "batch")  # option A: groups of the test batch, with their own statistics
    normalizing, sample = [], []

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor | tuple) -> None:
        x = inputs[0].float()
        _, variance = group_stats(x, statistics)
        # BKN: its Kalman estimate (not the state it passes on, which may describe its output)
        estimate = module.filter(*inputs)[1].var if isinstance(module, KalmanNorm2d) else variance
        # The moving variance is an EMA of unbiased variances (n / (n - 1)): compare like with like.
        count = statistics * x[0, 0].numel()
        correction = count / max(count - 1, 1)
        sample.append(variance * correction)
        normalizing.append(estimate * correction)

    handle = norm.register_forward_hook(record)
    try:
        for images, _ in loader:
            images = images[: len(images) - len(images) % statistics]  # whole groups only
            if len(images):
                model(images.to(device))
            if sum(len(v) for v in sample) >= batches:
                break
    finally:
        handle.remove()
    moving = norm.running_var.float().cpu()

    def gap(variances: list[Tensor]) -> Tensor:  # (channels, batches)
        return (torch.cat(variances)[:batches].T.cpu() - moving[:, None]).abs()

    return Gaps(run, layer, gap(normalizing), gap(sample), moving)


def pick_runs(runs: Sequence[Run], seed: int) -> dict[str, Run]:
    chosen = {}
    for normalizer in NORMALIZERS:
        matching = [run for run in runs if run.finished and run.summary.get("normalizer") == normalizer
                    and run.summary.get("seed") == seed and run.directory is not None]
        if not matching:
            raise SystemExit(f"error: no finished {normalizer} run of experiment fig8 with seed {seed}; "
                             f"run `make fig8` (or pass --runs-dir / --seed)")
        chosen[normalizer] = matching[0]
    return chosen


def plot(gaps: dict[str, Gaps], title: str, path: Path) -> None:
    top = max(float(g.normalizing.quantile(0.99)) for g in gaps.values()) or 1.0
    figure, axes = plt.subplots(1, len(gaps), figsize=(6.2 * len(gaps), 4.8), squeeze=False)
    for axis, (normalizer, gap) in zip(axes.flat, gaps.items()):
        image = axis.imshow(gap.normalizing, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        axis.set_title(f"{normalizer.upper()}: mean gap {gap.normalizing.mean():.3g}", fontsize=10)
        axis.set_xlabel("test batch (statistics group)")
        axis.set_ylabel("channel")
        figure.colorbar(image, ax=axis, label="|batch variance - moving variance|")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_table(gaps: dict[str, Gaps], scale: str, out_dir: Path) -> None:
    rows = []
    for normalizer, gap in gaps.items():
        relative = gap.normalizing / (gap.moving[:, None] + 1e-12)
        rows.append({"experiment": "fig8", "scale": scale, "normalizer": normalizer, "run": gap.run.name,
                     "layer": gap.layer, "channels": gap.normalizing.shape[0], "batches": gap.normalizing.shape[1],
                     "mean_gap": float(gap.normalizing.mean()), "median_gap": float(gap.normalizing.median()),
                     "mean_relative_gap": float(relative.mean()), "mean_sample_variance_gap": float(gap.sample.mean()),
                     "paper": PAPER_CLAIM})
    with open(out_dir / "fig8.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# fig8 — batch variance against moving variance after training, BN vs BKN", ""]
    if scale == "smoke":
        lines += ["Scale **smoke**: a few training steps on synthetic data; this only shows that the analysis "
                  "runs, not whether the paper's claim holds.", ""]
    lines += [f"Layer `{rows[0]['layer']}`; {rows[0]['batches']} test statistics groups of inference option A. "
              "Gap: |variance the layer normalizes with - its moving variance| (BN: the group's sample variance; "
              "BKN: its Kalman estimate), both unbiased. Heat map: fig8.png.", "",
              "| normalizer | mean gap — ours | median gap — ours | mean gap / moving variance — ours "
              "| mean sample-variance gap — ours | paper |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['normalizer'].upper()} | {r['mean_gap']:.4g} | {r['median_gap']:.4g} | {r['mean_relative_gap']:.4g} "
              f"| {r['mean_sample_variance_gap']:.4g} | {PAPER_CLAIM} |" for r in rows]
    lines += ["", f"Regenerate: `make fig8 SCALE={scale}`"]
    (out_dir / "fig8.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="smoke", help="which scale's runs (default smoke); names the output folder")
    parser.add_argument("--runs-dir", type=Path, help="folder of run records (default runs/<scale>)")
    parser.add_argument("--out-dir", type=Path, help="where to write (default results/<scale>)")
    parser.add_argument("--layer", help="module name of the normalization layer to hook (default: the deepest "
                                        "one after a k x k conv)")
    parser.add_argument("--batches", type=int, default=64, help="statistics groups to show (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="which seed's runs (default 0)")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches={args.batches}; it must be at least 1")
    runs_dir = args.runs_dir or Path("runs") / args.scale
    out_dir = args.out_dir or Path("results") / args.scale
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = pick_runs(load_local(runs_dir, ["fig8"]), args.seed)
    gaps = {normalizer: measure(run, args.layer, args.batches, device) for normalizer, run in runs.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = gaps["bn"].layer
    plot(gaps, f"fig8: |batch variance - moving variance| at {layer}, channels x test batches "
               f"(scale {args.scale})", out_dir / "fig8.png")
    write_table(gaps, args.scale, out_dir)
    print(f"wrote {out_dir / 'fig8'}.{{png,md,csv}}")


if __name__ == "__main__":
    main()
