"""Every registered model builds, runs forward on small and CIFAR-sized inputs, and counts match the papers."""

import pytest
import torch

import models
from prune_cli.errors import PruneCliError, UnknownName
from prune_cli.metrics import count_macs, count_params

SMALL = ["vgg11", "resnet20", "resnet50"]


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_builds_and_runs(name):
    model = models.create_model(name, num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    assert model.prune_cli_arch == {"factory": name, "kwargs": {"num_classes": 7, "in_channels": 1}}


def test_vgg16_counts_match_li_et_al():
    """Li et al. (1608.08710) Table 2: VGG-16 (CIFAR-10) has 3.13e8 MACs, 1.5e7 params; the issue: 313.7M, 14.98M."""
    model = models.create_model("vgg16", num_classes=10)
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    assert macs == pytest.approx(313.7e6, rel=0.005)
    assert count_params(model) == pytest.approx(14.98e6, rel=0.005)


def test_resnet56_counts_match_published_within_projection_cost():
    """Published ResNet-56: 125.5M MACs, 0.85M params with zero-padding shortcuts. Ours has two 1x1 projection
    shortcuts (16->32 at 16x16 and 32->64 at 8x8): +131,072 + 131,072 MACs and +512 + 2,048 params, so
    125.75M MACs (+0.2%) and 0.8515M params."""
    model = models.create_model("resnet56", num_classes=10)
    macs = count_macs(model, torch.randn(1, 3, 32, 32))
    projection_macs = 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8
    assert macs - projection_macs == pytest.approx(125.5e6, rel=0.003)
    assert count_params(model) == pytest.approx(0.85e6, rel=0.005)


def test_list_models_wildcard():
    assert models.list_models("resnet*") == sorted(
        ["resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34", "resnet50"]
    )
    assert models.list_models("vgg1?") == ["vgg11", "vgg13", "vgg16", "vgg19"]


def test_unknown_model_suggests_a_name():
    with pytest.raises(UnknownName, match="did you mean 'resnet56'"):
        models.create_model("resnet65")


def test_torchvision_model_builds_without_download():
    model = models.create_model("torchvision:resnet18", num_classes=5, in_channels=1).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(UnknownName):
        models.create_model("torchvision:resnet19")


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_torchvision_models_with_auxiliary_heads_train_on_one_output(name):
    """Built without the heads: one logits tensor in train mode too (the engine's contract), and no modules that eval
    mode never runs (the channel analysis could not see their inputs)."""
    model = models.create_model(f"torchvision:{name}", num_classes=4).train()
    assert model(torch.randn(2, 3, 80, 80)).shape == (2, 4)
    assert not any("aux" in n for n, _ in model.named_modules())


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(
        "import torch.nn as nn\n"
        "def tiny(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "NOT_A_FACTORY = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.create_model("my_nets:tiny", num_classes=3, in_channels=1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(PruneCliError, match="no callable"):
        models.create_model("my_nets:NOT_A_FACTORY")
    with pytest.raises(PruneCliError, match="cannot import"):
        models.create_model("no_such_pkg_xyz:f")
