"""SGD with the weight-decay split, and the learning-rate schedule as a pure function of the step.

The optimizer is torch's fused SGD: it takes a ``found_inf`` flag tensor and skips the whole
update on the device when the flag is set, so a non-finite step is skipped without the host ever
reading the flag. The schedule is stateless (``learning_rate(step)``), so nothing about it needs
to be checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def build_optimizer(model: nn.Module, settings: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters; 1-D parameters (norm weights and biases, conv and
    linear biases, BKN gains) get no weight decay unless ``decay_norm_and_bias``."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            exempt = parameter.ndim <= 1 and not settings["decay_norm_and_bias"]
            (no_decay if exempt else decay).append(parameter)
    groups = [{"params": params, "weight_decay": weight_decay}
              for params, weight_decay in ((decay, settings["weight_decay"]), (no_decay, 0.0)) if params]
    optimizer = torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"],
                                nesterov=settings["nesterov"], fused=True)
    if settings["momentum"] > 0:
        # Fused SGD creates momentum buffers uninitialized and fills them on the first step, unless
        # that step is skipped (found_inf): then the garbage stays. Zero buffers give the same first
        # update as torch's buffer = gradient (dampening 0) and make a skipped first step harmless.
        for parameter in decay + no_decay:
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return optimizer


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: Mapping[str, Any]) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then ``step`` (times ``gamma`` at each milestone, a fraction of
    ``total_steps``) or ``cosine`` (to zero at the last step)."""
    warmup = schedule["warmup_steps"]
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule["name"] == "cosine":
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    passed = sum(step >= round(fraction * total_steps) for fraction in schedule["milestones"])
    return base_lr * schedule["gamma"] ** passed
