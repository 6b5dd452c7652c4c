"""Test helpers shared across test files.

tests/support is on pytest's pythonpath (not tests/ itself: its criteria/ folder would shadow the criteria package).
"""

from collections.abc import Callable

import torch
from torch import nn

from prune_cli.testing import randomise_bn  # noqa: F401  (re-exported: tests import it from here)


class ConcatNet(nn.Module):
    """A user's own CNN: two branches concatenated on channels, then flatten -> linear (spatial expansion)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(8, 5, 1)
        self.mix = nn.Conv2d(11, 7, 3, stride=2, padding=1)
        self.fc = nn.Linear(7 * 8 * 8, num_classes)  # for 16x16 inputs

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.b(x))], dim=1)
        x = torch.relu(self.mix(x))
        return self.fc(torch.flatten(x, 1))


def concat_net(num_classes: int = 10, in_channels: int = 3) -> ConcatNet:
    return ConcatNet(num_classes, in_channels)


def three_conv_net() -> nn.Module:
    """Three 3x3 convs (16, 16, 8 channels) and a linear head, for (N, 3, 12, 12) inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 144, 10),
    ).eval()  # fmt: skip


def tiny_vgg() -> nn.Module:
    """prune-cli's VGG-11 (CIFAR-style) with random weights and BatchNorm statistics, for (N, 3, 16, 16) inputs."""
    import models  # here, not at the top: conftest sets torch's threads before models builds anything

    torch.manual_seed(2)
    return randomise_bn(models.create_model("vgg11", num_classes=10, in_channels=3))


def tiny_resnet() -> nn.Module:
    """prune-cli's ResNet-20 with random weights and BatchNorm statistics, for (N, 3, 16, 16) inputs."""
    import models

    torch.manual_seed(1)
    return randomise_bn(models.create_model("resnet20", num_classes=10, in_channels=3))


def tiny_narrow_vgg() -> nn.Module:
    """prune-cli's VGG class at a quarter of VGG-11's widths or less (16-32-32-64-64, hidden 512), for (N, 3, 16, 16)
    inputs: the zoo's architecture at a size where criteria that fit per-group models take a second."""
    from models.vgg import VGG

    torch.manual_seed(5)
    return randomise_bn(VGG([16, "M", 32, "M", 32, 64, "M", 64], num_classes=10, in_channels=3))


def tiny_concat_net() -> nn.Module:
    torch.manual_seed(3)
    return randomise_bn(concat_net())


def tiny_three_conv_net() -> nn.Module:
    torch.manual_seed(4)
    return randomise_bn(three_conv_net())


# The tiny models every criterion is checked on (tests/test_conformance.py): name -> (factory, example input shape).
# Every built-in criterion supports the zoo's architectures (VGG, basic-block ResNet); the other two are a user's CNNs.
TINY_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int, int]]] = {
    "vgg": (tiny_narrow_vgg, (1, 3, 16, 16)),
    "resnet20": (tiny_resnet, (1, 3, 16, 16)),
    "concat_net": (tiny_concat_net, (1, 3, 16, 16)),
    "three_conv_net": (tiny_three_conv_net, (1, 3, 12, 12)),
}
ZOO_MODELS = ("vgg", "resnet20")


def train_digits_base(folder, epochs: int = 1):
    """A ResNet-20 trained `epochs` epochs on digits by `prune-cli train`, saved as FOLDER/base.safetensors."""
    from typer.testing import CliRunner

    from prune_cli.cli import app

    out = folder / "base.safetensors"
    result = CliRunner().invoke(app, ["train", "--model", "resnet20", "--dataset", "digits", "--epochs", str(epochs),
                                      "--out", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def write_experiment(path, **values):
    """A tiny digits experiment YAML at `path` (Path); `values` override or add keys. Returns `path`."""
    import yaml

    spec = {
        "name": "tiny", "dataset": "digits", "targets": [0.3], "seeds": [0, 1], "finetune": {"epochs": 1},
        "latency_batches": [1], "latency_seconds": 0.05, "calib_images": 128, **values,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(spec))
    return path
