"""What the API offers every criterion: the context's cost model, trial removal and captured outputs, and the
DynamicCriterion contract (a dynamic criterion says how its model is rebuilt from a model file)."""

import copy
from typing import Any

import pytest
import torch
from torch import nn

import models
from prune_cli import metrics
from prune_cli.api import (
    CRITERIA,
    CalibData,
    Context,
    Criterion,
    Dynamic,
    DynamicCriterion,
    Target,
    register_criterion,
)
from prune_cli.api.graph import channel_groups
from prune_cli.errors import BadModelFile
from prune_cli.store.modelfile import load_model, save_model


def context(model, x, calib=None):
    groups = tuple(channel_groups(model, x))
    return Context(model, tuple(g for g in groups if g.prunable), groups, x, 10, Target("macs", 0.5), calib=calib)


def test_cost_model_is_built_once_and_counts_as_metrics(tiny_resnet, example_input):
    ctx = context(tiny_resnet, example_input)
    cost = ctx.cost_model()
    assert ctx.cost_model() is cost
    assert cost.base_macs == metrics.count_macs(tiny_resnet, example_input)
    assert cost.base_params == metrics.count_params(tiny_resnet)


def test_prune_keeps_the_named_channels_and_leaves_the_model(tiny_vgg, example_input):
    ctx = context(tiny_vgg, example_input)
    before = copy.deepcopy(tiny_vgg.state_dict())
    g = ctx.groups[1]
    keep = {g.id: torch.arange(0, g.size, 2)}
    small = ctx.prune(keep)
    assert all(torch.equal(v, tiny_vgg.state_dict()[k]) for k, v in before.items())
    assert metrics.count_macs(small, example_input) == ctx.cost_model().cost({g.id: g.size // 2})[0]
    # another model of the same structure, already pruned: its groups are found again
    h = ctx.groups[2]
    smaller = ctx.prune({h.id: torch.arange(3)}, model=small)
    assert smaller.get_submodule(h.producers[0].module).out_channels == 3
    assert small.get_submodule(h.producers[0].module).out_channels == h.size


def test_iter_module_outputs_are_the_concatenated_outputs_batch_by_batch(tiny_resnet, example_input):
    x = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ctx = context(tiny_resnet, example_input, calib=CalibData(x, torch.zeros(10, dtype=torch.long)))
    names = ["layer1.0.bn1", "layer2.0.conv1"]
    batches = list(ctx.iter_module_outputs(names, batch_size=4))
    assert [len(b["layer1.0.bn1"]) for b in batches] == [4, 4, 2]
    whole = ctx.module_outputs(names, batch_size=4, inputs=False)
    for n in names:
        assert torch.equal(torch.cat([b[n] for b in batches]), whole[n])
    with torch.no_grad():
        assert torch.equal(whole["layer1.0.bn1"][:4], tiny_resnet.layer1[0].bn1(tiny_resnet.layer1[0].conv1(
            torch.relu(tiny_resnet.bn1(tiny_resnet.conv1(x[:4]))))))  # fmt: skip
    next(iter(ctx.iter_module_outputs(names, batch_size=4)))  # left early: its hooks go with the generator
    assert not any(m._forward_hooks for m in tiny_resnet.modules())


def test_a_dynamic_criterion_must_say_how_to_rebuild_its_model():
    class Old(Criterion):  # the old way: a dynamic flag and no base class
        name, paper, dynamic = "old-dynamic", "0000.00000", True

    with pytest.raises(TypeError, match="DynamicCriterion"):
        register_criterion()(Old)

    class NoRebuild(DynamicCriterion):
        name, paper = "no-rebuild", "0000.00000"

    with pytest.raises(TypeError, match="rebuild"):
        register_criterion()(NoRebuild)
    assert "old-dynamic" not in CRITERIA.names() and "no-rebuild" not in CRITERIA.names()

    class Fine(DynamicCriterion):
        name, paper = "fine", "0000.00000"

        def run(self, ctx: Context) -> Dynamic:
            return Dynamic(ctx.model, config={"criterion": self.name})

        @classmethod
        def rebuild(cls, model: nn.Module, config: dict[str, Any]) -> nn.Module:
            return model

    assert NoRebuild.__abstractmethods__ == {"rebuild"} and not Fine.__abstractmethods__ and Fine.dynamic
    with pytest.raises(TypeError):
        NoRebuild()


def test_a_model_file_whose_dynamic_state_names_a_static_criterion_is_refused(tmp_path):
    model = models.create_model("resnet20").eval()
    model.prune_cli_dynamic = {"criterion": "l1"}
    path = save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(BadModelFile, match="no dynamic model"):
        load_model(path)
