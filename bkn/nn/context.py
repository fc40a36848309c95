"""BKN in a model that does not pass its estimate along: the per-forward context that
:func:`bkn.nn.convert_batchnorm` installs.

A network written for BatchNorm calls each norm with a tensor alone (``y = self.bn1(x)``). In a
converted model each BKN layer so called takes its prior from the estimate the BKN layer run
just before it passed on, in the order the forward pass runs them, and leaves its own for the
next: the context holds that one estimate. A forward pre-hook on the converted model opens a
fresh context (the first BKN layer of every forward gets no prior: it is BN on its groups) and
a forward hook closes it, so no tensor outlives the forward. The bundled networks thread the
estimate through branches and residual sums instead (docs/normalizers.md compares the two).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bkn.nn.state import State


class Alone(enum.Enum):
    """The default of ``KalmanNorm2d.forward``'s prior: called as ``layer(x)``, not ``layer(x, prior)``."""

    ALONE = "alone"


ALONE = Alone.ALONE


@dataclass(eq=False)
class KalmanContext:
    """The estimate the last BKN layer of the current forward passed on (None: none yet)."""

    state: State = field(default=None, repr=False)

    def open(self, module: nn.Module, args: Any) -> None:  # forward pre-hook of the converted model
        self.state = None

    def close(self, module: nn.Module, args: Any, output: Any) -> None:  # its forward hook (always called)
        self.state = None


@dataclass(eq=False)
class ContextLink:
    """What a converted BKN layer needs besides itself: its model's context, and the conv that
    feeds it (for the analytic and Monte-Carlo transitions; None for the linear one and for the
    first layer). A plain object, not a module, so the conv is not registered twice."""

    context: KalmanContext
    conv: nn.Conv2d | None = None


def forward_in_context(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for a BKN layer called with a tensor alone: prior from the context, posterior into it."""
    link: ContextLink | None = getattr(layer, "context_link", None)
    if link is None:
        raise TypeError(f"{type(layer).__name__} was called with a tensor alone outside a converted model: build the "
                        f"model with BatchNorm and convert it (bkn.nn.convert_batchnorm(model, 'bkn')), which passes "
                        f"the estimate from layer to layer, or pass it yourself: y, state = layer(x, prior)")
    if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
        # A forward run by autograd: activation checkpointing recomputing a segment in the backward
        # pass, when the context of the original forward is gone; the prior would silently differ.
        raise RuntimeError(f"{type(layer).__name__} of a converted model was run inside a backward pass (activation "
                           f"checkpointing?): its prior came from the forward's context, which is gone; checkpoint "
                           f"only segments without BKN layers, or use a bundled network (bkn.models)")
    previous = link.context.state
    if previous is not None and previous.num_channels != layer.in_features:
        followed = "none" if layer.in_features is None else f"one of {layer.in_features} channels"
        raise ValueError(f"{type(layer).__name__}({layer.num_features}) got the estimate of {previous.num_channels} "
                         f"channels of the BKN layer run before it, but was converted to follow {followed} (in module "
                         f"order): pass example_input to bkn.nn.convert_batchnorm, which then follows the order the "
                         f"forward runs the layers")
    y, link.context.state = layer.forward(x, layer.predict(previous, link.conv))
    return y
