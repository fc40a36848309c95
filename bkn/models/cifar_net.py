"""The paper's small CIFAR network (Sec. 4.4): a 32-filter conv, three GoogLeNet inception
modules (256, 480 and 512 channels), global average pooling and a linear classifier.

The paper's table lost its spatial sizes. Choices made here, so that the same network takes
32x32 CIFAR images and 8x8 digits:

- the stem is a 3x3 conv with stride 1 (no early downsampling: the images are already small);
- the first two modules (GoogLeNet's 3a, 3b) run at the input resolution, and a 3x3 / stride-2
  max pool sits between the second and third module, where GoogLeNet has one (before 4a):
  32x32 -> 32, 32, 16; 8x8 -> 8, 8, 4;
- each module is GoogLeNet's: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool (stride 1) -> 1x1;
- the classifier maps the 512 pooled channels to ``num_classes`` (the paper's text mentions a
  1000-way layer; a CIFAR classifier has 10 or 100 outputs).
"""

from __future__ import annotations

from torch import Tensor, nn

from bkn.models.blocks import Branch, Inception, check_image_size, init_weights
from bkn.nn import ConvNormAct, NormSpec, State

TOTAL_STRIDE = 2  # the one max pool


def googlenet_module(in_channels: int, conv1x1: int, reduce3x3: int, conv3x3: int, reduce5x5: int,
                     conv5x5: int, pool_projection: int, norm: NormSpec) -> Inception:
    """GoogLeNet's inception module; outputs ``conv1x1 + conv3x3 + conv5x5 + pool_projection`` channels."""
    return Inception([
        Branch([ConvNormAct(in_channels, conv1x1, 1, norm)]),
        Branch([ConvNormAct(in_channels, reduce3x3, 1, norm), ConvNormAct(reduce3x3, conv3x3, 3, norm)]),
        Branch([ConvNormAct(in_channels, reduce5x5, 1, norm), ConvNormAct(reduce5x5, conv5x5, 5, norm)]),
        Branch([ConvNormAct(in_channels, pool_projection, 1, norm)], pool=nn.MaxPool2d(3, stride=1, padding=1)),
    ])


# GoogLeNet's widths for the three modules: 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection
MODULE_WIDTHS = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64))


class CifarNet(nn.Module):
    """``width`` scales every layer's channels (rounded): Table 3's "BN widened to BKN's parameter
    count" is ``width=1.17`` against BKN's linear transition."""

    def __init__(self, num_classes: int, norm: NormSpec, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"cifar_net width must be positive, got width={width} (model.width=...)")
        scaled = lambda channels: max(1, round(channels * width))  # noqa: E731
        stem = scaled(32)
        self.stem = ConvNormAct(in_channels, stem, 3, norm, first=True)
        widths = [tuple(scaled(c) for c in module) for module in MODULE_WIDTHS]
        module_out = [w[0] + w[2] + w[4] + w[5] for w in widths]  # 256, 480, 512 at width 1
        self.inception1 = googlenet_module(stem, *widths[0], norm)
        self.inception2 = googlenet_module(module_out[0], *widths[1], norm)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inception3 = googlenet_module(module_out[1], *widths[2], norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(module_out[2], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        state: State = None
        x, state = self.stem(x, state)
        x, state = self.inception1(x, state)
        x, state = self.inception2(x, state)
        x, state = self.inception3(self.pool(x), state)  # the pool keeps the state
        return self.fc(self.avgpool(x).flatten(1))


def cifar_net(num_classes: int, norm: NormSpec, image_size: int, in_channels: int = 3,
              width: float = 1.0) -> CifarNet:
    check_image_size("cifar_net", image_size, TOTAL_STRIDE)
    return CifarNet(num_classes, norm, in_channels, width)
