"""Building blocks the models share: norms that take a BKN prior, pre-activation, inception
branches, weight initialization and the image-size check.

Every block's forward takes and returns ``(x, state)``: ``state`` is the BKN estimate of the
statistics of ``x`` (a :class:`~bkn.nn.KalmanState`), or ``None`` with BN / BRN / GN, where it costs
nothing. Branches and residual sums combine states with :func:`bkn.nn.concat_states` and
:func:`bkn.nn.add_states`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from bkn.nn import (NORMALIZERS, ConvNormAct, KalmanNorm2d, NormSpec, State, activation_after, apply_norm,
                    build_norm, concat_states, norm_options)


class NormAct(nn.Module):
    """norm -> ReLU (or one layer that is both) on a tensor whose state is already known: pre-activation ResNets."""

    def __init__(self, channels: int, norm: NormSpec) -> None:
        super().__init__()
        self.norm = build_norm(num_features=channels, in_features=channels, **norm_options(norm))
        self.act = activation_after(self.norm)

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        y, state = apply_norm(self.norm, x, state, conv=None)
        return self.act(y), state


def build_transition(channels: int, in_channels: int, norm: NormSpec) -> KalmanNorm2d | None:
    """A BKN layer used only for its ``predict``: the state of a conv that no norm follows.

    The authors' pre-activation branch ends in a conv whose output is summed with the shortcut
    before the next norm sees it; the sum's prior needs this conv's prediction. No affine
    parameters and no running statistics, so only the linear transition's ``A`` is learned.
    ``None`` for BN / BRN / GN.
    """
    norm = norm_options(norm)
    if not getattr(NORMALIZERS.get(norm["name"]), "carries_state", False):
        return None
    return build_norm(num_features=channels, in_features=in_channels,
                      **{**norm, "affine": False, "track_running_stats": False})


class Branch(nn.Module):
    """One inception branch: an optional pool, then ConvNormAct blocks (none: pass-through).

    A pool changes where the values are, not what they are, so the input state passes it unchanged.
    """

    def __init__(self, convs: Sequence[ConvNormAct], pool: nn.Module | None = None) -> None:
        super().__init__()
        self.pool = pool if pool is not None else nn.Identity()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        x = self.pool(x)
        for conv in self.convs:
            x, state = conv(x, state)
        return x, state


class Inception(nn.Module):
    """Branches that all start from the module's input and its state, concatenated on channels."""

    def __init__(self, branches: Sequence[Branch]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        outputs = [branch(x, state) for branch in self.branches]
        return torch.cat([y for y, _ in outputs], dim=1), concat_states([s for _, s in outputs])


def init_weights(model: nn.Module) -> None:
    """torchvision's initialization: He normal (fan_out) convs; norms keep weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def check_image_size(model_name: str, image_size: int, total_stride: int) -> None:
    """Refuse inputs smaller than the model's downsampling: its last feature map would be padding."""
    if image_size < total_stride:
        raise ValueError(f"{model_name} downsamples by {total_stride}, so image_size={image_size} is too small; "
                         f"use image_size >= {total_stride} (model.image_size or data.image_size)")
