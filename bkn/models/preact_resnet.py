"""The authors' CIFAR pre-activation ResNet (``KalmanNorm/cifar-kn-microbatch.py`` in
wanggrun/Kalman-Normalization; He et al. 2016, "Identity Mappings"), depth ``6n + 2``.

A 3x3 conv with 16 filters, its norm and ReLU; three stages of ``n`` blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 has stride 2); a final norm and ReLU, global average
pooling and a linear classifier. A block is ``[norm -> relu] -> conv -> norm -> relu -> conv``
plus a shortcut; the very first block skips the leading norm (the stem has just normalized).
Where a block halves the size, the shortcut is a 2x2 average pool whose output is zero-padded
from C to 2C channels (half before, half after), as in the authors' code.

BKN state, as in the authors' code: the branch's last conv has no norm of its own, so its
output's state is the prior predicted through it; the sum's state is the block input's state
(zero-padded like the shortcut) plus that prior; the next norm takes it as its prior unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bkn.models.blocks import NormAct, build_transition, check_image_size, init_weights
from bkn.nn import ConvNormAct, NormSpec, State, add_states

TOTAL_STRIDE = 4
DEPTHS = {"preact_resnet32": 32, "preact_resnet110": 110}  # the authors' two, built by name (aliases)


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormSpec,
                 preactivate: bool = True) -> None:
        super().__init__()
        self.preact = NormAct(in_channels, norm) if preactivate else None
        self.conv1 = ConvNormAct(in_channels, out_channels, 3, norm, stride=stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.conv2_transition = build_transition(out_channels, out_channels, norm)
        # ceil_mode: an odd size halves like the stride-2 conv (7 -> 4), so the sum's shapes match.
        self.shortcut_pool = nn.AvgPool2d(2, ceil_mode=True) if stride == 2 else None
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        out, branch_state = (x, state) if self.preact is None else self.preact(x, state)
        out, branch_state = self.conv1(out, branch_state)
        out = self.conv2(out)
        if self.conv2_transition is not None:
            branch_state = self.conv2_transition.predict(branch_state, self.conv2)
        shortcut = x
        if self.shortcut_pool is not None:
            half = self.extra_channels // 2
            shortcut = F.pad(self.shortcut_pool(x), (0, 0, 0, 0, half, self.extra_channels - half))
        return out + shortcut, add_states(state, branch_state)  # add_states pads the state alike


class PreActResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, norm: NormSpec, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"model.depth={depth}: a pre-activation ResNet has depth 6n + 2 with n >= 1 "
                             f"(8, 14, 20, 32, 56, 110, ...)")
        blocks_per_stage = (depth - 2) // 6
        self.stem = ConvNormAct(in_channels, 16, 3, norm, first=True)
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(PreActBlock(channels, width, stride, norm, preactivate=bool(stage or index)))
                channels = width
        self.blocks = nn.ModuleList(blocks)
        self.final = NormAct(channels, norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x, state = self.stem(x, None)
        for block in self.blocks:
            x, state = block(x, state)
        x, _ = self.final(x, state)
        return self.fc(self.avgpool(x).flatten(1))


def preact_resnet(num_classes: int, norm: NormSpec, image_size: int, depth: int = 32,
                  in_channels: int = 3) -> PreActResNet:
    """The network of any depth ``6n + 2`` (``model=preact_resnet model.depth=14``)."""
    check_image_size(f"preact_resnet{depth}", image_size, TOTAL_STRIDE)
    return PreActResNet(depth, num_classes, norm, in_channels)


def preact_resnet_alias(name: str, num_classes: int, norm: NormSpec, image_size: int,
                        in_channels: int = 3) -> PreActResNet:
    """The authors' network of depth ``DEPTHS[name]``, by name (``model=preact_resnet32``)."""
    return preact_resnet(num_classes, norm, image_size, DEPTHS[name], in_channels)
