"""`prune_cli.prune`: the notebook entry point, on a tiny model and on torchvision's ResNet-18."""

import subprocess
import sys

import pytest
import torch
from helpers import TINY_MODELS

import prune_cli
from prune_cli.api import CalibData
from prune_cli.errors import BadValue, TargetUnreachable
from prune_cli.metrics import count_macs
from prune_cli.testing import synthetic_calib


def tiny(name="resnet20"):
    factory, shape = TINY_MODELS[name]
    return factory(), torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_prune_returns_a_smaller_model_and_its_report():
    model, x = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = prune_cli.prune(model, x, "l1", target_macs=0.5)
    assert report.result == "Scores" and report.metric == "macs" and report.requested == 0.5
    assert report.macs_before == count_macs(model, x) and report.macs_after == count_macs(small, x)
    assert 0.5 <= report.achieved < 0.6
    assert report.params_after < report.params_before
    assert small(x).shape == model(x).shape
    # per-group widths: what the pruned layers really have, fewer than before where pruned
    assert report.widths["layer1.0.conv1"] == small.layer1[0].conv1.out_channels < report.sizes["layer1.0.conv1"]
    assert set(report.widths) == set(report.sizes)
    assert report.as_dict()["options"] == {"mode": "independent", "reduce": "mean"}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is untouched


def test_prune_takes_criterion_options_a_params_target_and_calibration_data():
    model, x = tiny("vgg")
    greedy, report = prune_cli.prune(model, x, "l1", target_params=0.3, mode="greedy",
                                     selection={"mode": "global", "round_to": 4})  # fmt: skip
    assert report.metric == "params" and report.achieved >= 0.3 and report.options["mode"] == "greedy"
    assert all(w % 4 == 0 for w in report.widths.values())
    calib = synthetic_calib(model, x, 32)
    small, report = prune_cli.prune(model, x, "dcs", target_macs=0.3, calib=(calib.x, calib.y))
    assert report.result == "Scores" and report.achieved >= 0.3
    small, report = prune_cli.prune(model, x, "lasso", target_macs=0.3, calib=calib.x, images=16)
    assert report.result == "Plan" and report.achieved >= 0.3
    small, report = prune_cli.prune(model, x, "sensitivity", 0.3, calib, levels=[0.5], trials=1, max_ratio=0.8)
    assert report.result == "Allocation" and report.achieved >= 0.3 and report.options["max_ratio"] == 0.8


def test_prune_is_what_a_run_does_with_the_same_steps():
    """The same criterion, selection and surgery as `prune-cli prune`: the plan equals pruning.score + remove."""
    from prune_cli.run import pruning
    from prune_cli.surgery import channel_groups

    model, x = tiny()
    small, _ = prune_cli.prune(model, x, "l1", target_macs=0.4, selection="global")
    job = pruning.PruneJob(criterion="l1", target=pruning.Target("macs", 0.4), mode="global")
    groups = channel_groups(model, x)
    ctx = pruning.context(model, groups, x, 10, None, job, x.device)
    reference, _, _ = pruning.remove(pruning.score(pruning.build_criterion("l1", {}), ctx, job), ctx, groups, job)
    assert torch.equal(small(x), reference(x))


def test_prune_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    small, report = prune_cli.prune(model, x, "l1", target_macs=0.5, scope="all")
    assert report.achieved >= 0.5 and small(x).shape == (1, 10)
    assert small.layer1[0].conv1.out_channels == report.widths["layer1.0.conv1"] < 64
    assert small.conv1.out_channels < 64  # scope all: the residual stream is pruned too


def test_prune_dynamic_criterion_returns_its_input_dependent_model():
    model, x = tiny()
    dyn, report = prune_cli.prune(model, x, "haste", target_macs=0.3, search_images=4)
    assert report.result == "Dynamic" and report.widths == report.sizes
    assert 0 < report.achieved and report.macs_after < report.macs_before
    assert dyn(x).shape == (1, 10)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(criterion="l1", target_macs=0.99), TargetUnreachable, "cannot remove 99.0%"),
        (dict(criterion="dcs"), BadValue, "pass calib=\\(x, y\\)"),
        (dict(criterion="dcs", calib=torch.randn(4, 3, 16, 16)), BadValue, "needs labelled images"),
        (dict(criterion="manidp", calib=CalibData(torch.randn(4, 3, 16, 16), torch.arange(4))), BadValue,
         "learns while fine-tuning"),
        (dict(criterion="l1", target_macs=None), BadValue, "give a target"),
        (dict(criterion="l1", selection={"modes": "global"}), BadValue, "unknown selection settings"),
        (dict(criterion="l1", typo=1), Exception, "unknown l1 option 'typo'"),
        (dict(criterion="l2"), Exception, "unknown criterion 'l2'"),
    ],
)  # fmt: skip
def test_prune_refuses_bad_calls_in_one_line(kwargs, error, message):
    model, x = tiny()
    with pytest.raises(error, match=message):
        prune_cli.prune(model, x, **kwargs)


def test_prune_is_exported_lazily():
    """`import prune_cli` (what `prune-cli --help` pays for) must not import torch; `prune_cli.prune` imports it."""
    from prune_cli.run import notebook

    subprocess.run([sys.executable, "-c", "import sys, prune_cli; assert 'torch' not in sys.modules"], check=True)
    assert prune_cli.prune is notebook.prune and "prune" in prune_cli.__all__
