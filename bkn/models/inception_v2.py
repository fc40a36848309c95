"""InceptionV2: BN-Inception (Ioffe & Szegedy 2015, Fig. 5), the paper's ImageNet network.

Built from the table of Ioffe & Szegedy's Fig. 5 as printed (like the Caffe model most ports
use): its stated widths of 4c and 4d (576) do not add up; the branch widths do, giving 608 and
1056 channels before 4e and 5a. The first layer is a plain 7x7 conv, every conv is followed by
its norm and a ReLU, and there is no auxiliary head and no dropout. Pools pad by 1 so that any
input of at least 32 pixels works (224 -> 7x7 before the global average pool; 32 -> 1x1).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from torch import Tensor, nn

from bkn.models.blocks import Branch, Inception, check_image_size, init_weights
from bkn.nn import ConvNormAct, NormSpec, State

TOTAL_STRIDE = 32


class ModuleSpec(NamedTuple):
    """One row of the table; ``projection=None`` passes the pooled input through (stride-2 modules)."""

    conv1x1: int
    reduce3x3: int
    conv3x3: int
    reduce_double3x3: int
    double3x3: int
    pool: Literal["avg", "max"]
    projection: int | None
    stride: int = 1


MODULES: dict[str, ModuleSpec] = {
    "3a": ModuleSpec(64, 64, 64, 64, 96, "avg", 32),
    "3b": ModuleSpec(64, 64, 96, 64, 96, "avg", 64),
    "3c": ModuleSpec(0, 128, 160, 64, 96, "max", None, stride=2),
    "4a": ModuleSpec(224, 64, 96, 96, 128, "avg", 128),
    "4b": ModuleSpec(192, 96, 128, 96, 128, "avg", 128),
    "4c": ModuleSpec(160, 128, 160, 128, 160, "avg", 128),
    "4d": ModuleSpec(96, 128, 192, 160, 192, "avg", 128),
    "4e": ModuleSpec(0, 128, 192, 192, 256, "max", None, stride=2),
    "5a": ModuleSpec(352, 192, 320, 160, 224, "avg", 128),
    "5b": ModuleSpec(352, 192, 320, 192, 224, "max", 128),
}


def bn_inception_module(in_channels: int, spec: ModuleSpec, norm: NormSpec) -> tuple[Inception, int]:
    """The module and its number of output channels."""
    s = spec
    branches = [
        Branch([ConvNormAct(in_channels, s.reduce3x3, 1, norm),
                ConvNormAct(s.reduce3x3, s.conv3x3, 3, norm, stride=s.stride)]),
        Branch([ConvNormAct(in_channels, s.reduce_double3x3, 1, norm),
                ConvNormAct(s.reduce_double3x3, s.double3x3, 3, norm),
                ConvNormAct(s.double3x3, s.double3x3, 3, norm, stride=s.stride)]),
    ]
    if s.conv1x1:
        branches.insert(0, Branch([ConvNormAct(in_channels, s.conv1x1, 1, norm)]))
    pool = nn.AvgPool2d(3, s.stride, 1) if s.pool == "avg" else nn.MaxPool2d(3, s.stride, 1)
    projection = [ConvNormAct(in_channels, s.projection, 1, norm)] if s.projection else []
    branches.append(Branch(projection, pool=pool))
    out_channels = s.conv1x1 + s.conv3x3 + s.double3x3 + (s.projection or in_channels)
    return Inception(branches), out_channels


class InceptionV2(nn.Module):
    def __init__(self, num_classes: int, norm: NormSpec, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(in_channels, 64, 7, norm, stride=2, first=True)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2_reduce = ConvNormAct(64, 64, 1, norm)
        self.conv2 = ConvNormAct(64, 192, 3, norm)
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception = nn.ModuleDict()
        channels = 192
        for name, spec in MODULES.items():
            self.inception[name], channels = bn_inception_module(channels, spec, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        state: State = None
        x, state = self.conv1(x, state)
        x, state = self.conv2_reduce(self.pool1(x), state)  # pools keep the state
        x, state = self.conv2(x, state)
        x = self.pool2(x)
        for module in self.inception.values():
            x, state = module(x, state)
        return self.fc(self.avgpool(x).flatten(1))


def inception_v2(num_classes: int, norm: NormSpec, image_size: int, in_channels: int = 3) -> InceptionV2:
    check_image_size("inception_v2", image_size, TOTAL_STRIDE)
    return InceptionV2(num_classes, norm, in_channels)
