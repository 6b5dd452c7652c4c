"""Test helpers shared across test files.

tests/support is on pytest's pythonpath (not tests/ itself: its criteria/ folder would shadow the criteria package).
"""

import torch
from torch import nn


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


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that equivalence tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def three_conv_net() -> nn.Module:
    """Three 3x3 convs (16, 16, 8 channels) and a linear head, for (N, 3, 12, 12) inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 144, 10),
    ).eval()  # fmt: skip


def train_digits_base(folder, epochs: int = 1):
    """A ResNet-20 trained `epochs` epochs on digits by `prune-cli train`, saved as FOLDER/base.safetensors."""
    from typer.testing import CliRunner

    from prune_cli.cli import app

    out = folder / "base.safetensors"
    result = CliRunner().invoke(app, ["train", "--model", "resnet20", "--dataset", "digits", "--epochs", str(epochs),
                                      "--out", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out
