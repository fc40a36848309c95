"""ResNet-18/34/50/101/152 as torchvision builds them (bottleneck v1.5: stride in the 3x3 conv).

Modules and parameters carry torchvision's names (``conv1``, ``bn1``, ``layer3.4.bn2``,
``downsample.0`` / ``downsample.1``, ``fc``), so a torchvision ``state_dict`` loads strictly into
the BN variant and the parameter counts are torchvision's. That is why the blocks keep convs and
norms as separate attributes and pair them with :func:`~bkn.models.blocks.apply_norm` (the rule
of ``ConvNormAct``) instead of holding ``ConvNormAct`` modules.

BKN state: the residual branch starts from the block input's state; at the sum, the shortcut's
state (the input's, or the downsample norm's posterior) and the branch's last posterior add.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from bkn.models.blocks import check_image_size, init_weights
from bkn.nn import NormSpec, State, activation_after, add_states, apply_norm, build_norm, norm_options

TOTAL_STRIDE = 32


def conv_norm(in_channels: int, out_channels: int, kernel_size: int, norm: NormSpec,
              stride: int = 1, relu_follows: bool = True) -> tuple[nn.Conv2d, nn.Module]:
    """A conv and its norm; ``relu_follows=False`` where the norm's output goes into a residual sum."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
    return conv, build_norm(num_features=out_channels, in_features=in_channels, relu_follows=relu_follows,
                            **norm_options(norm))


class Downsample(nn.Sequential):
    """torchvision's ``downsample``: ``0`` a strided 1x1 conv, ``1`` its norm; no activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__(*conv_norm(in_channels, out_channels, 1, norm, stride, relu_follows=False))

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        conv, norm = self
        return apply_norm(norm, conv(x), state, conv)


class ResidualBlock(nn.Module):
    """What both block kinds share: the shortcut, the sum with its state, the last norm."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride, norm) if needs_projection else None

    def last_norm(self) -> nn.Module:
        raise NotImplementedError

    def residual_sum(self, x: Tensor, state: State, out: Tensor, branch_state: State) -> tuple[Tensor, State]:
        """``relu(branch + shortcut)``; the sum's state is the sum of the two states."""
        shortcut, shortcut_state = (x, state) if self.downsample is None else self.downsample(x, state)
        return self.relu(out + shortcut), add_states(branch_state, shortcut_state)


class BasicBlock(ResidualBlock):
    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__(in_channels, channels * self.expansion, stride, norm)
        self.conv1, self.bn1 = conv_norm(in_channels, channels, 3, norm, stride)
        self.act1 = activation_after(self.bn1)
        self.conv2, self.bn2 = conv_norm(channels, channels, 3, norm, relu_follows=False)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        out, branch_state = apply_norm(self.bn1, self.conv1(x), state, self.conv1)
        out = self.act1(out)
        out, branch_state = apply_norm(self.bn2, self.conv2(out), branch_state, self.conv2)
        return self.residual_sum(x, state, out, branch_state)


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormSpec) -> None:
        super().__init__(in_channels, channels * self.expansion, stride, norm)
        self.conv1, self.bn1 = conv_norm(in_channels, channels, 1, norm)
        self.act1 = activation_after(self.bn1)
        self.conv2, self.bn2 = conv_norm(channels, channels, 3, norm, stride)
        self.act2 = activation_after(self.bn2)
        self.conv3, self.bn3 = conv_norm(channels, channels * self.expansion, 1, norm, relu_follows=False)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor, state: State = None) -> tuple[Tensor, State]:
        out, branch_state = apply_norm(self.bn1, self.conv1(x), state, self.conv1)
        out = self.act1(out)
        out, branch_state = apply_norm(self.bn2, self.conv2(out), branch_state, self.conv2)
        out = self.act2(out)
        out, branch_state = apply_norm(self.bn3, self.conv3(out), branch_state, self.conv3)
        return self.residual_sum(x, state, out, branch_state)


class ResNet(nn.Module):
    def __init__(self, block: type[ResidualBlock], layers: Sequence[int], num_classes: int,
                 norm: NormSpec, in_channels: int = 3, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = build_norm(num_features=64, **norm_options(norm))  # the first norm: no predecessor, no in_features
        self.relu = activation_after(self.bn1)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if index == 1 else 2
            stage = []
            for block_index in range(blocks):
                stage.append(block(channels, width, stride if block_index == 0 else 1, norm))
                channels = width * block.expansion
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)
        if zero_init_residual:  # each block starts as the identity (Goyal et al. 2017)
            for module in self.modules():
                if isinstance(module, ResidualBlock) and module.last_norm().weight is not None:
                    nn.init.zeros_(module.last_norm().weight)

    def forward(self, x: Tensor) -> Tensor:
        x, state = apply_norm(self.bn1, self.conv1(x), None, self.conv1)
        x = self.maxpool(self.relu(x))  # the pool keeps the state
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x, state = block(x, state)
        return self.fc(self.avgpool(x).flatten(1))


LAYOUTS: dict[str, tuple[type[ResidualBlock], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def resnet(name: str, num_classes: int, norm: NormSpec, image_size: int, in_channels: int = 3,
           zero_init_residual: bool = False) -> ResNet:
    """The ResNet of torchvision's layout ``name`` (a key of :data:`LAYOUTS`)."""
    check_image_size(name, image_size, TOTAL_STRIDE)
    block, layers = LAYOUTS[name]
    return ResNet(block, layers, num_classes, norm, in_channels, zero_init_residual)
