"""Parameter and MAC counts of the models, for every normalizer side by side.

MACs (multiply-accumulates) are counted by forward hooks on every ``nn.Conv2d`` and
``nn.Linear`` for one image; the normalizers' own arithmetic (statistics, the Kalman update,
BKN's transitions on ``(groups, channels)`` statistics) is not included. Models are built on the
``meta`` device: shapes only, no memory and no arithmetic, so even ResNet-152 takes a moment.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from bkn.models import PAPER_INPUT, build_model

# The rows of the table: BKN's transitions differ in parameters (the linear one learns A).
NORM_VARIANTS: dict[str, dict[str, Any]] = {
    "bn": {"name": "bn"},
    "brn": {"name": "brn"},
    "gn": {"name": "gn"},
    "frn": {"name": "frn"},
    "evonorm_s0": {"name": "evonorm_s0"},
    "cbn": {"name": "cbn"},
    "bkn (analytic)": {"name": "bkn", "transition": "analytic"},
    "bkn (monte_carlo)": {"name": "bkn", "transition": "monte_carlo"},
    "bkn (linear)": {"name": "bkn", "transition": "linear"},
}


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of the conv and linear layers for one ``image_size`` x ``image_size`` image."""
    total = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        outputs_per_image = output[0].numel()
        if isinstance(module, nn.Conv2d):
            kernel_height, kernel_width = module.kernel_size
            total += outputs_per_image * module.in_channels // module.groups * kernel_height * kernel_width
        else:
            total += outputs_per_image * module.in_features

    hooks = [module.register_forward_hook(count) for module in model.modules()
             if isinstance(module, (nn.Conv2d, nn.Linear))]
    try:
        device = next(model.parameters()).device
        was_training = model.training
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, in_channels, image_size, image_size, device=device))
            model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def summarize(name: str, norms: Mapping[str, Mapping[str, Any]], image_size: int | None = None,
              num_classes: int | None = None, options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per normalizer: ``{"model", "norm", "parameters", "macs", "image_size"}``; ``options``
    are the model's own (``{"depth": 14}`` for preact_resnet, shown in the model's name)."""
    image_size = image_size or PAPER_INPUT[name].image_size
    num_classes = num_classes or PAPER_INPUT[name].num_classes
    rows = []
    for label, norm in norms.items():
        with torch.device("meta"):
            model = build_model(name, num_classes, norm, image_size, **(options or {}))
        shown = f"{name}-d{options['depth']}" if options and "depth" in options else name
        rows.append({"model": shown, "norm": label, "parameters": count_parameters(model),
                     "macs": count_macs(model, image_size), "image_size": image_size})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, ready for the docs."""
    lines = ["| model | normalizer | input | parameters | MACs |", "|---|---|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['norm']} | {row['image_size']}x{row['image_size']} | "
                     f"{row['parameters']:,} ({row['parameters'] / 1e6:.2f} M) | {row['macs'] / 1e9:.3f} G |")
    return "\n".join(lines)
