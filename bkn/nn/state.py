"""The estimate BKN passes from layer to layer, and how it combines where a network branches."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class KalmanState(NamedTuple):
    """Estimated per-group statistics of a feature map: ``mean`` and diagonal ``var``, ``(G, C)``."""

    mean: Tensor
    var: Tensor

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def __repr__(self) -> str:  # one line, not two tensors' worth of numbers
        return (f"KalmanState(groups={self.mean.shape[0]}, channels={self.num_channels}, "
                f"dtype={str(self.mean.dtype).removeprefix('torch.')}, device={self.mean.device})")


State = Optional[KalmanState]


def concat_states(states: list[State]) -> State:
    """Inception output: the channel concatenation of the branches' states (None if any is None)."""
    if any(state is None for state in states):
        return None
    return KalmanState(torch.cat([s.mean for s in states], dim=1), torch.cat([s.var for s in states], dim=1))


def pad_channels(state: State, channels: int) -> State:
    """Zero-pad a state to ``channels`` (half before, half after), as the authors' shortcut does."""
    if state is None or state.num_channels == channels:
        return state
    extra = channels - state.num_channels
    if extra < 0:
        raise ValueError(f"cannot pad a state of {state.num_channels} channels down to {channels}")
    padding = (extra // 2, extra - extra // 2)
    return KalmanState(F.pad(state.mean, padding), F.pad(state.var, padding))


def add_states(a: State, b: State) -> State:
    """Residual sum: means add and variances add (the authors' rule; independence assumed)."""
    if a is None or b is None:
        return None
    channels = max(a.num_channels, b.num_channels)
    a, b = pad_channels(a, channels), pad_channels(b, channels)
    return KalmanState(a.mean + b.mean, a.var + b.var)
