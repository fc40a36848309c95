"""ConvNormAct: conv -> norm -> activation (or one layer that is both: FRN, EvoNorm-S0), the one block every model is built from, and
Sequential, the container that chains such blocks.

ConvNormAct owns both the conv and the norm, because BKN's ``analytic`` and ``monte_carlo``
transitions push the previous layer's estimate through this very conv. Its forward takes and
returns ``(x, state)``; with BN or BRN the state is ``None`` and costs nothing. torch's
``nn.Sequential`` passes one value from module to module, so blocks go in ``bkn.nn.Sequential``,
which passes the state along too.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from torch import Tensor, nn

from bkn.nn.norms import build_norm
from bkn.nn.state import State

NormSpec = Union[Mapping[str, Any], str]  # {"name": "bkn", "statistics_batch_size": 2, ...}, or just "bn"


def norm_options(norm: NormSpec) -> dict[str, Any]:
    """:func:`build_norm`'s keyword arguments for ``norm``: a name alone is short for ``{"name": name}``."""
    return {"name": norm} if isinstance(norm, str) else dict(norm)


def apply_norm(norm: nn.Module, y: Tensor, state: State, conv: nn.Conv2d | None) -> tuple[Tensor, State]:
    """Normalize ``y``, the output of ``conv`` (None: ``state`` already describes ``y``).

    A BKN layer first predicts its prior from ``state`` through ``conv``; CBN takes ``conv`` itself
    (its statistics' compensation needs the conv's weight); other norms (ours or torch's) drop the
    state. Blocks whose conv and norm live under other names (torchvision's ``conv1`` / ``bn1``) or
    whose norm comes before the conv use this rule directly.
    """
    if getattr(norm, "carries_state", False):
        return norm(y, norm.predict(state, conv))
    if getattr(norm, "uses_conv", False):
        return norm(y, conv), None
    return norm(y), None


def activation_after(norm: nn.Module) -> nn.Module:
    """The ReLU a network applies after ``norm``: none (``nn.Identity``) where ``norm`` applies its
    own activation in its place (FRN + TLU, EvoNorm-S0 built with ``apply_act``)."""
    if getattr(norm, "fuses_activation", False) and norm.apply_act:
        return nn.Identity()
    return nn.ReLU(inplace=True)


class ConvNormAct(nn.Module):
    """``first=True`` marks a network's first normalization layer: it never receives a state (it is
    BN on its groups), so its norm is built without ``in_features`` and BKN's linear transition
    creates no ``A`` that would never get a gradient (DDP refuses such parameters)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], norm: NormSpec,
                 stride: int = 1, padding: int | tuple[int, int] | None = None, act: bool = True,
                 first: bool = False) -> None:
        super().__init__()
        if padding is None:
            padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.norm = build_norm(num_features=out_channels, in_features=None if first else in_channels,
                               relu_follows=act, **norm_options(norm))
        self.act = activation_after(self.norm) if act else nn.Identity()

    threads_state = True  # forward takes and returns (x, state): Sequential passes the state on

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        if isinstance(x, tuple):
            raise TypeError("ConvNormAct received the (x, state) pair of the block before it: chain blocks in "
                            "bkn.nn.Sequential, which passes the state along (torch's nn.Sequential passes one value)")
        y, state = apply_norm(self.norm, self.conv(x), state, self.conv)
        return self.act(y), state


class Sequential(nn.Sequential):
    """``nn.Sequential`` for bkn blocks: ``x, state = Sequential(...)(x)``. A module with
    ``threads_state`` (ConvNormAct, a nested Sequential) gets the state of the block before it;
    any other module (pooling, dropout, flatten, a classifier) gets ``x`` alone and the state
    passes it unchanged, as the networks in bkn.models do around their pools."""

    threads_state = True

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        for module in self:
            if getattr(module, "threads_state", False):
                x, state = module(x, state)
            else:
                x = module(x)
        return x, state
