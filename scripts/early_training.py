"""Why BKN with the linear transition died on the default command: the first steps, measured.

It replays the first ``--steps`` optimizer steps of ``python train.py`` (cifar_net on the digits,
(16, 2), SGD lr 0.1 with momentum 0.9 and weight decay 2e-4, no warm-up; the step schedule keeps
lr 0.1 for the first half of its 300 steps) with BN and with BKN, and records at each step:

- the training loss and the spread (std) of the logits;
- how well each BKN layer's prior fits what it then observes: the median over groups and channels
  of ``prior variance / observed variance``, summarized over the layers as the median, and the
  share of layers whose ratio lies outside [1/2, 2];
- how normalized each layer's output is: the mean over channels of ``|mean| / std`` of the output
  (0 after BN, which centres every group);
- the share of ReLU outputs that are zero (dead units).

Each variant starts from the same initialization and sees the same batches. It writes a markdown
table (docs/normalizers.md quotes it):

    python scripts/early_training.py --out results/study/early_training.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn.data import build_datasets, build_loader
from bkn.engine.optim import build_optimizer
from bkn.functional import group_stats
from bkn.models import build_model
from bkn.nn import KalmanNorm2d

STATISTICS = 2
VARIANTS = {  # name: normalizer spec
    "bn": {"name": "bn"},
    "bkn-linear, no warm-up (before)": {"name": "bkn", "transition": "linear", "gain_warmup": 0},
    "bkn-analytic, no warm-up": {"name": "bkn", "transition": "analytic", "gain_warmup": 0},
    "bkn-linear, gain warm-up 100 (default)": {"name": "bkn", "transition": "linear"},
}
SHOWN_STEPS = (0, 1, 2, 3, 5, 10, 20, 30, 49)
OPTIMIZER = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 2e-4, "decay_norm_and_bias": False}


class Probe:
    """Forward hooks that record, for one forward pass, each norm's prior fit and output centring
    and the ReLUs' share of zeros."""

    def __init__(self, model: nn.Module) -> None:
        self.ratios: list[float] = []
        self.centring: list[float] = []
        self.zeros: list[float] = []
        for module in model.modules():
            if isinstance(module, (KalmanNorm2d, nn.BatchNorm2d)) or type(module).__name__ == "BatchNorm2d":
                if getattr(module, "affine", True):
                    module.register_forward_hook(self._norm)
            elif isinstance(module, nn.ReLU):
                module.register_forward_hook(self._relu)

    def reset(self) -> None:
        self.ratios, self.centring, self.zeros = [], [], []

    def _norm(self, module: nn.Module, args: tuple, output) -> None:
        x, prior = args[0], (args[1] if len(args) > 1 else None)
        y = output[0] if isinstance(output, tuple) else output
        if prior is not None:
            _, observed = group_stats(x.detach().float(), STATISTICS)
            self.ratios.append((prior.var.detach() / (observed + 1e-5)).median().item())
        var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3))
        self.centring.append((mean.abs() / var.clamp_min(1e-12).sqrt()).mean().item())

    def _relu(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.zeros.append((output.detach() == 0).float().mean().item())


def replay(norm: dict, steps: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    data = build_datasets("digits")
    model = build_model("cifar_net", data.num_classes, {**norm, "statistics_batch_size": STATISTICS},
                        data.image_size, in_channels=data.channels)
    optimizer = build_optimizer(model, OPTIMIZER)
    loader = build_loader(data.train, 16, train=True, seed=seed)
    probe = Probe(model)
    rows, batches = [], iter(loader)
    for step in range(steps):
        images, labels = next(batches)
        probe.reset()
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        far = sum(not 0.5 <= ratio <= 2 for ratio in probe.ratios)
        rows.append({"step": step, "loss": loss.item(), "logits_std": logits.detach().std().item(),
                     "ratio": statistics.median(probe.ratios) if probe.ratios else None,
                     "far": far / len(probe.ratios) if probe.ratios else None,
                     "centring": statistics.mean(probe.centring), "zeros": statistics.mean(probe.zeros)})
    return rows


def table(results: dict[str, list[dict]], steps: int, seed: int) -> str:
    lines = [f"# The first {steps} steps of `python train.py`, BN against BKN (seed {seed})", "",
             "cifar_net on the digits at (16, 2), lr 0.1 without warm-up (scripts/early_training.py). "
             "prior/obs: median over BKN layers of each layer's median prior variance / observed variance; "
             "far: share of those layers off by more than 2x; |mean|/std: how uncentred the norms' outputs "
             "are (0 = centred, as BN makes them); zeros: share of ReLU outputs that are 0.", ""]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| step | loss | logits std | prior/obs | far | \\|mean\\|/std | zeros |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            if row["step"] in SHOWN_STEPS or row["step"] == steps - 1:
                ratio = "—" if row["ratio"] is None else f"{row['ratio']:.2f}"
                far = "—" if row["far"] is None else f"{row['far']:.0%}"
                lines.append(f"| {row['step']} | {row['loss']:.3f} | {row['logits_std']:.2f} | {ratio} | {far} | "
                             f"{row['centring']:.2f} | {row['zeros']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/study/early_training.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: replay(norm, args.steps, args.seed) for name, norm in VARIANTS.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(results, args.steps, args.seed) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
