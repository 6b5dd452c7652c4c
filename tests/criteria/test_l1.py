"""L1-norm filter scores (Li et al., arXiv 1608.08710)."""

import torch

from prune_cli.api import Context, Scores, Target, check_result, get_criterion
from prune_cli.selection.plan import groups_in_scope
from prune_cli.surgery import channel_groups
from prune_cli.testing import make_context


def run(model, x, **options):
    cls = get_criterion("l1")
    ctx = make_context(model, x)
    return check_result(cls(cls.Options(**options)).run(ctx), ctx.groups), ctx


def test_scores_equal_hand_computation(tiny_vgg, example_input):
    result, _ = run(tiny_vgg, example_input)
    assert isinstance(result, Scores)
    w = tiny_vgg.features[4].weight
    assert torch.allclose(result.per_group["features.4"], w.abs().sum((1, 2, 3)) / w.abs().sum((1, 2, 3)).mean())


def test_planted_zero_filter_ranks_last(tiny_resnet, example_input):
    with torch.no_grad():
        tiny_resnet.layer2[1].conv1.weight[5] = 0
    result, _ = run(tiny_resnet, example_input)
    assert int(result.per_group["layer2.1.conv1"].argmin()) == 5


def test_greedy_differs_from_independent_only_after_a_pruned_layer(tiny_vgg, example_input):
    independent, _ = run(tiny_vgg, example_input)
    greedy, _ = run(tiny_vgg, example_input, mode="greedy")
    assert torch.equal(independent.per_group["features.0"], greedy.per_group["features.0"])  # first layer: same
    assert not torch.allclose(independent.per_group["features.4"], greedy.per_group["features.4"])


def test_residual_groups_average_normalised_members(tiny_resnet, example_input):
    cls = get_criterion("l1")
    groups = channel_groups(tiny_resnet, example_input)
    ctx = Context(tiny_resnet, tuple(groups_in_scope(groups, "all")), tuple(groups), example_input, 10, Target())
    scores = cls().run(ctx).per_group["conv1"]
    members = [tiny_resnet.get_submodule(m).weight.abs().sum((1, 2, 3)) for m in
               ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")]  # fmt: skip
    expected = torch.stack([s / s.mean() for s in members]).mean(0)
    assert torch.allclose(scores, expected, atol=1e-6)
