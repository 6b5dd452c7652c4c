"""Sensitivity allocation (Lu et al., SBPF, arXiv 2208.04588; Distiller's sweep as anchor)."""

import copy

import pytest
import torch
from helpers import concat_net, randomise_bn
from torch import nn

from criteria.sensitivity import _damage, is_conv_group
from prune_cli.api import Allocation, CalibData, Target, check_result, get_criterion
from prune_cli.api.graph import split, trace
from prune_cli.errors import BadValue
from prune_cli.run import pruning
from prune_cli.testing import make_context

FAST = dict(levels=(0.3, 0.7), trials=1, batch_size=32)


def calib_for(model, n=64, seed=1):
    """Random 3x16x16 images labelled by the model itself (baseline accuracy 1), so damage shows as a drop."""
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    return CalibData(x, y)


def context(model, x, scope="internal", target=0.5, seed=0, calib=None):
    return make_context(model, x, scope=scope, target=target, seed=seed, calib=calib or calib_for(model))


def run(ctx, **options):
    cls = get_criterion("sensitivity")
    return check_result(cls(cls.Options(**{**FAST, **options})).run(ctx), ctx.groups)


@pytest.mark.parametrize("model_name, scope", [("tiny_vgg", "internal"), ("tiny_resnet", "all")])
def test_conformance_and_sweep_rows(request, example_input, model_name, scope):
    model = request.getfixturevalue(model_name)
    ctx = context(model, example_input, scope)
    result = run(ctx)
    assert isinstance(result, Allocation) and result.rank == "l1"
    assert set(result.ratios) == {g.id for g in ctx.groups}
    assert all(0 <= r <= 0.9 for r in result.ratios.values())
    rows = result.extra["sweep"]
    swept = [g.id for g in ctx.groups if is_conv_group(g)]  # layers=conv (default): conv groups only
    assert len(rows) == len(swept) * 2 and set(rows[0]) == {"group", "level", "trial", "accuracy", "loss"}
    assert result.extra["baseline"]["accuracy"] == 1.0 and result.extra["reuse"] is True
    assert set(result.extra["sensitivity"]) == set(swept)


def test_deterministic_for_a_seed_and_seed_matters(tiny_resnet, example_input):
    a = run(context(tiny_resnet, example_input, seed=3))
    b = run(context(tiny_resnet, example_input, seed=3))
    c = run(context(tiny_resnet, example_input, seed=4))
    assert a.extra["sweep"] == b.extra["sweep"] and a.ratios == b.ratios
    assert [r["loss"] for r in a.extra["sweep"]] != [r["loss"] for r in c.extra["sweep"]]


def test_context_model_is_left_untouched(tiny_vgg, example_input):
    before = copy.deepcopy(tiny_vgg.state_dict())
    run(context(tiny_vgg, example_input), damage="noise")
    assert all(torch.equal(before[k], v) for k, v in tiny_vgg.state_dict().items())


@pytest.mark.parametrize("damage", ["random", "noise"])
def test_graph_cut_gives_the_same_sweep_as_whole_model_evaluation(tiny_resnet, example_input, damage):
    ctx = context(tiny_resnet, example_input, scope="all")
    cut, whole = run(ctx, damage=damage), run(ctx, damage=damage, reuse=False)
    assert cut.extra["reuse"] and not whole.extra["reuse"]
    for r, s in zip(cut.extra["sweep"], whole.extra["sweep"], strict=True):
        assert (r["group"], r["level"], r["accuracy"]) == (s["group"], s["level"], s["accuracy"])
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6)


def test_l1_damage_equals_zeroing_the_lowest_l1_channels_by_hand(tiny_vgg, example_input):
    ctx = context(tiny_vgg, example_input)
    rows = run(ctx, damage="l1", levels=(0.5,), trials=3, layers="all").extra["sweep"]
    assert len(rows) == len(ctx.groups)  # deterministic damage: one trial per level
    model = copy.deepcopy(tiny_vgg)
    conv, bn = model.features[4], model.features[5]  # group features.4: 128 channels
    order = torch.sort(conv.weight.abs().sum((1, 2, 3)), stable=True).indices[:64]
    with torch.no_grad():
        conv.weight[order] = 0
        bn.weight[order] = 0
        bn.bias[order] = 0
        logits = model(ctx.calib.x)
    expected = float((logits.argmax(1) == ctx.calib.y).float().mean())
    loss = float(nn.functional.cross_entropy(logits, ctx.calib.y))
    row = next(r for r in rows if r["group"] == "features.4")
    assert row["accuracy"] == pytest.approx(expected) and row["loss"] == pytest.approx(loss, rel=1e-5)


def test_residual_group_is_damaged_in_every_producer_and_norm(tiny_resnet, example_input):
    ctx = context(tiny_resnet, example_input, scope="all")
    g = ctx.group("conv1")  # stage-1 residual channels: stem and every block's conv2 of layer1
    patches = _damage(tiny_resnet, g, 0.5, 0, "random", ctx, None)
    modules = [tiny_resnet.get_submodule(m.module) for m in g.producers + g.norms]
    assert len(g.producers) == 4 and len(modules) == 8
    assert {p.tensor.data_ptr() for p in patches} == {p.data_ptr() for m in modules for p in m.parameters()}
    chans = {tuple(p.rows.tolist()) for p in patches}
    assert len(chans) == 1 and len(next(iter(chans))) == g.size // 2  # the same channels everywhere


@pytest.mark.parametrize("loud, muted", [("a", "b"), ("b", "a")])
def test_a_more_sensitive_group_gets_a_smaller_ratio(example_input, loud, muted):
    """Two concatenated branches a (6 channels) and b (5): the next conv reads one branch 10x louder and the other
    1e6x quieter, so damaging the quiet branch cannot change the output. Known answer: S(quiet) is the least of
    all groups and gets the largest ratio; the loud branch gets a smaller one. Swapping the roles swaps them."""
    model = randomise_bn(concat_net(10, 3)).eval()
    cols = {"a": slice(0, 6), "b": slice(6, 11)}
    with torch.no_grad():
        model.mix.weight[:, cols[loud]] *= 10
        model.mix.weight[:, cols[muted]] *= 1e-6
    ctx = context(model, example_input)
    for measure in ("accuracy", "loss"):
        result = run(ctx, measure=measure, levels=(0.4, 0.8), trials=2, form="inverse", cost_aware=False)
        sens, ratios = result.extra["sensitivity"], result.ratios
        assert sens[loud] > 0.01 and sens[muted] < 1e-4, sens
        assert ratios[muted] == max(ratios.values()) and ratios[loud] < ratios[muted]
    linear = run(ctx, form="linear", cost_aware=False, measure="loss")
    most = max(linear.extra["sensitivity"], key=linear.extra["sensitivity"].get)
    assert linear.ratios[most] == 0.0 and linear.ratios[muted] == max(linear.ratios.values())


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_target_met_through_the_shared_selection(tiny_resnet, example_input, target):
    ctx = context(tiny_resnet, example_input, target=target)
    result = run(ctx)
    job = pruning.PruneJob(criterion="sensitivity", target=Target("macs", target))
    keep, overrides, report = pruning.plan_from_result(result, ctx, job)
    assert not overrides and keep
    assert target <= report["achieved"] < target + 0.03


def test_the_graph_split_reproduces_the_model_at_every_cut(tiny_resnet, example_input):
    """The sweep's reuse: the graph cut before any node, every value crossing the cut handed over."""
    gm = trace(tiny_resnet.eval())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = tiny_resnet(x)
        for at in range(1, len(gm.graph.nodes), 7):
            prefix, suffix = split(gm, at)
            assert torch.allclose(suffix(*prefix(x)), want, atol=1e-6)


def test_linear_form_prunes_a_single_group(example_input):
    """`linear` gives the most sensitive group ratio 0; with one group in scope that must not mean no cut at all."""
    torch.manual_seed(0)
    model = randomise_bn(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    )  # fmt: skip
    ctx = context(model, example_input, target=0.3)
    assert [g.id for g in ctx.groups] == ["0"]
    result = run(ctx)
    assert result.ratios["0"] > 0
    assert plan_ratios(result, ctx, 0.3)["0"] > 0.2


def test_defaults_are_the_measured_ones():
    """experiments/results/fmnist-vgg/sensitivity-defaults/README.md: conv groups only, linear, cost-aware."""
    o = get_criterion("sensitivity").Options()
    assert (o.layers, o.form, o.cost_aware, o.rank) == ("conv", "linear", True, "l1")


def test_bad_options():
    cls = get_criterion("sensitivity")
    for bad in (dict(levels=(0.5, 1.0)), dict(trials=0), dict(damage="blur"), dict(max_ratio=1.0), dict(layers="fc")):
        with pytest.raises(BadValue):
            cls.Options(**bad)


# ------------------------------------------------------------------------------------- layers and cost-aware form
def plan_ratios(result, ctx, target):
    """Per group the fraction the shared selection removes (what `prune` would cut)."""
    job = pruning.PruneJob(criterion="sensitivity", target=Target("macs", target))
    return pruning.plan_from_result(result, ctx, job)[2]["ratios"]


def test_layers_conv_never_cuts_a_linear_group(tiny_vgg, example_input):
    """VGG's hidden Linear (classifier.1, 512 units) is a group of its own: with layers=conv (default) it is neither
    swept nor cut; with layers=all the same setting does cut it, so the check is able to fail."""
    ctx = context(tiny_vgg, example_input, target=0.5)
    linear = [g.id for g in ctx.groups if not is_conv_group(g)]
    assert linear == ["classifier.1"]
    conv = run(ctx)
    assert conv.ratios["classifier.1"] == 0.0 and "classifier.1" not in conv.extra["sensitivity"]
    assert all(r["group"] != "classifier.1" for r in conv.extra["sweep"])
    assert plan_ratios(conv, ctx, 0.5)["classifier.1"] == 0.0
    assert plan_ratios(run(ctx, layers="all"), ctx, 0.5)["classifier.1"] > 0.0


class CheapBranch(nn.Module):
    """stem (3x3 at 16x16) feeds an expensive branch `a` (3x3 conv at 16x16) and a cheap one `b` (1x1 conv on the
    pooled 1x1 map: under 0.1% of the MACs); both reach the classifier. x: (N, 3, 16, 16) -> (N, 10)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn_s = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.a, self.bn_a = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        s = torch.relu(self.bn_s(self.stem(x)))
        a = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn_a(self.a(s))), 1)
        b = torch.relu(self.bn_b(self.b(nn.functional.adaptive_avg_pool2d(s, 1))))
        return self.fc(torch.flatten(torch.cat([a, b], 1), 1))


@pytest.mark.parametrize("form", ["inverse", "linear"])
def test_cost_aware_gives_a_cheap_insensitive_group_no_more_than_its_fair_cut(example_input, form):
    """The classifier reads branch b 1e6x quieter, so damaging b changes nothing (S at the floor): plain `inverse`
    sends it to the cap, plain `linear` well above its fair cut. Its fair cut is what the uniform selection removes
    from every group at the same target; the cost-aware allocation (ratio weighed by the share of the MACs, b's is
    under 0.1%) gives it no more than that, and the expensive groups pay for the target."""
    torch.manual_seed(0)
    model = randomise_bn(CheapBranch()).eval()
    with torch.no_grad():
        model.fc.weight[:, 16:] *= 1e-6
    target = 0.4
    ctx = context(model, example_input, target=target)
    assert {g.id for g in ctx.groups} == {"stem", "a", "b"}
    uniform = pruning.plan_from_result(
        get_criterion("l1")().run(ctx), ctx, pruning.PruneJob(target=Target("macs", target))
    )[2]["ratios"]
    fair = uniform["b"]
    assert 0.1 < fair < 0.6

    plain = run(ctx, form=form, cost_aware=False, levels=(0.4, 0.8), trials=2)
    assert plain.extra["sensitivity"]["b"] < 1e-3 < plain.extra["sensitivity"]["a"]
    cut = plan_ratios(plain, ctx, target)["b"]
    assert cut > fair + 0.2 and (form == "linear" or cut == pytest.approx(0.9, abs=0.07))  # inverse: the cap

    cost = run(ctx, form=form, cost_aware=True, levels=(0.4, 0.8), trials=2)
    assert cost.extra["cost_share"]["b"] < 1e-3 < 0.5 < cost.extra["cost_share"]["a"]
    ratios = plan_ratios(cost, ctx, target)
    assert ratios["b"] <= fair
    assert max(ratios["stem"], ratios["a"]) >= fair  # the cut went where the MACs are
