"""ConvNormAct: conv -> norm -> activation, the one block every model is built from.

It owns both the conv and the norm, because BKN's ``analytic`` and ``monte_carlo`` transitions
push the previous layer's estimate through this very conv. Its forward takes and returns
``(x, state)``; with BN or BRN the state is ``None`` and costs nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from bkn.nn.norms import build_norm
from bkn.nn.state import State

NormSpec = Mapping[str, Any]  # {"name": "bkn", "statistics_batch_size": 2, ...}: build_norm's arguments


class ConvNormAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], norm: NormSpec,
                 stride: int = 1, padding: int | tuple[int, int] | None = None, act: bool = True) -> None:
        super().__init__()
        if padding is None:
            padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.norm = build_norm(num_features=out_channels, in_features=in_channels, **norm)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        y = self.conv(x)
        if getattr(self.norm, "carries_state", False):  # any other norm module (torch's too) works
            y, state = self.norm(y, self.norm.predict(state, self.conv))
        else:
            y, state = self.norm(y), None
        return self.act(y), state
