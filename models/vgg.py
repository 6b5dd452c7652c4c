"""VGG with BatchNorm, CIFAR style (Li et al., arXiv 1608.08710, after Zagoruyko's cifar VGG).

Features: 3x3 convs with BN and ReLU, 2x2 max-pools; the last stage has no pool, and a global average pool
reduces the map to a 512-vector (on 32x32 inputs the map is 2x2 there, as in Li et al.'s AvgPool(2); the
adaptive pool also accepts 28x28). Classifier 512 -> 512 (BN, ReLU) -> classes.
"""

from __future__ import annotations

from torch import Tensor, nn

from models._registry import register_model

CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    """x: (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, config: list[int | str], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item))]
                layers.append(nn.ReLU(inplace=True))
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@register_model()
def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg11"], num_classes, in_channels)


@register_model()
def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg13"], num_classes, in_channels)


@register_model()
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg16"], num_classes, in_channels)


@register_model()
def vgg19(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS["vgg19"], num_classes, in_channels)
