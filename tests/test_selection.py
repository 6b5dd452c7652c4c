"""The shared selection: targets met by bisection, constraints respected, impossible targets refused."""

import pytest
import torch

import models
from prune_cli.api import Allocation, Scores, Target
from prune_cli.errors import BadValue, TargetUnreachable
from prune_cli.metrics import count_macs, count_params
from prune_cli.selection.plan import groups_in_scope, kept_count, select
from prune_cli.surgery import channel_groups, prune

X = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def resnet():
    model = models.create_model("resnet20").eval()
    groups = channel_groups(model, X)
    gen = torch.Generator().manual_seed(0)
    scores = Scores({g.id: torch.rand(g.size, generator=gen) for g in groups})
    return model, groups, scores


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("metric, reduction", [("macs", 0.3), ("macs", 0.5), ("params", 0.4)])
def test_target_is_met_and_reported(resnet, mode, metric, reduction):
    model, groups, scores = resnet
    sel = select(model, X, groups_in_scope(groups, "all"), scores, Target(metric, reduction), mode=mode)
    pruned = prune(model, X, sel.keep, groups=groups)
    measured = count_macs(pruned, X) if metric == "macs" else count_params(pruned)
    base = count_macs(model, X) if metric == "macs" else count_params(model)
    assert sel.achieved == pytest.approx(1 - measured / base)
    assert reduction <= sel.achieved <= reduction + 0.05  # met, and not by much more
    assert sel.requested == reduction


def test_scope_internal_never_touches_residual_groups(resnet):
    model, groups, scores = resnet
    scoped = groups_in_scope(groups, "internal")
    assert scoped and not any(g.residual for g in scoped)
    sel = select(model, X, scoped, scores, Target("macs", 0.3))
    residual_ids = {g.id for g in groups if g.residual}
    assert not residual_ids & set(sel.keep)


def test_keeps_the_highest_scores(resnet):
    model, groups, scores = resnet
    sel = select(model, X, groups_in_scope(groups), scores, Target("macs", 0.3))
    for gid, idx in sel.keep.items():
        s = scores.per_group[gid]
        assert s[idx].min() >= s[[i for i in range(len(s)) if i not in set(idx.tolist())]].max()


def test_round_to_and_minimum_one_channel():
    assert kept_count(64, 0.5, round_to=8) % 8 == 0
    assert kept_count(5, 0.99, max_ratio=0.99) == 1
    assert kept_count(64, 0.95, max_ratio=0.9) == 7  # the per-group maximum ratio caps the removal
    model = models.create_model("vgg11").eval()
    groups = groups_in_scope(channel_groups(model, X))
    scores = Scores({g.id: torch.arange(g.size, dtype=torch.float) for g in groups})
    sel = select(model, X, groups, scores, Target("macs", 0.5), round_to=8)
    assert all(len(i) % 8 == 0 for i in sel.keep.values())


def test_allocation_ratios_are_scaled_to_the_target(resnet):
    model, groups, scores = resnet
    scoped = groups_in_scope(groups)
    ratios = Allocation({g.id: (0.8 if i % 2 else 0.2) for i, g in enumerate(scoped)})
    sel = select(model, X, scoped, scores, Target("macs", 0.3), ratios=ratios)
    assert sel.achieved >= 0.3
    odd = [sel.ratios[g.id] for i, g in enumerate(scoped) if i % 2]
    even = [sel.ratios[g.id] for i, g in enumerate(scoped) if not i % 2]
    assert min(odd) > max(even)  # the relative allocation survives the scaling


def test_impossible_target_is_refused(resnet):
    model, groups, scores = resnet
    with pytest.raises(TargetUnreachable, match="the most the constraints allow"):
        select(model, X, groups_in_scope(groups), scores, Target("macs", 0.95))
    with pytest.raises(BadValue):
        Target("macs", 1.5)
