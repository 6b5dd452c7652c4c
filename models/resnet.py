"""ResNets with a CIFAR stem (3x3 conv, no max-pool) and projection shortcuts (1x1 conv + BN) where the
shape changes.

- resnet20/32/56/110 (He et al. 2016, section 4.2): basic blocks, widths 16-32-64, 6n+2 layers.
- resnet18/34/50: widths 64-128-256-512, basic (18, 34) or bottleneck (50, expansion 4) blocks.
Li et al. use zero-padding ("option A") shortcuts; projections add a few MACs (see tests/test_models.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from models._registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """x: (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, width) in enumerate(zip(num_blocks, widths, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, width, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(num_blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        if self.num_stages == 4:
            out = self.layer4(out)
        return self.fc(self.pool(out).flatten(1))


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> ResNet:
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels)


@register_model()
def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(20, num_classes, in_channels)


@register_model()
def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(32, num_classes, in_channels)


@register_model()
def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(56, num_classes, in_channels)


@register_model()
def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return _cifar_resnet(110, num_classes, in_channels)


@register_model()
def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


@register_model()
def resnet34(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels)


@register_model()
def resnet50(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels)
