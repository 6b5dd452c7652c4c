"""Channel-similarity clustering (Zhang et al., arXiv 1908.02620): plans, distances, merging."""

import numpy as np
import pytest
import torch

import models
from prune_cli.api import CalibData, Plan, Target, check_result, get_criterion
from prune_cli.run.pruning import PruneJob, plan_from_result
from prune_cli.surgery import prune
from prune_cli.testing import make_context as context


def run(ctx, **options):
    cls = get_criterion("similarity")
    return check_result(cls(cls.Options(**options)).run(ctx), ctx.groups)


def duplicate_channel(model, conv, bn, src, dst):
    """Make channel dst of conv+bn an exact copy of channel src (same filter, same BN parameters and stats)."""
    conv, bn = model.get_submodule(conv), model.get_submodule(bn)
    with torch.no_grad():
        conv.weight[dst] = conv.weight[src]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[dst] = t[src]


@pytest.mark.parametrize("arch", ["tiny_vgg", "tiny_resnet"])
@pytest.mark.parametrize("options", [{}, {"allocation": "threshold"}])
def test_plan_meets_target_and_prunes(arch, options, request, example_input):
    model = request.getfixturevalue(arch)
    ctx = context(model, example_input, target=0.5)
    result = run(ctx, **options)
    assert isinstance(result, Plan) and result.keep and result.overrides
    job = PruneJob(criterion="similarity", target=Target("macs", 0.5))
    keep, overrides, report = plan_from_result(result, ctx, job)
    assert 0.5 <= report["achieved"] < 0.53
    pruned = prune(model, example_input, keep, overrides)
    assert pruned(example_input).shape == (1, 10)
    widths = {g.id: len(idx) for g, idx in ((ctx.group(gid), idx) for gid, idx in keep.items())}
    for gid, k in widths.items():  # the producer conv really lost its filters
        assert pruned.get_submodule(ctx.group(gid).producers[0].module).weight.shape[0] == k
    if options:  # one global threshold: widths are not one uniform ratio
        ratios = {round(k / ctx.group(gid).size, 2) for gid, k in widths.items()}
        assert len(ratios) > 1


def test_deterministic(tiny_vgg, example_input):
    a = run(context(tiny_vgg, example_input))
    b = run(context(tiny_vgg, example_input))
    assert a.keep.keys() == b.keep.keys() and all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)
    assert a.overrides.keys() == b.overrides.keys()
    assert all(torch.equal(a.overrides[k], b.overrides[k]) for k in a.overrides)


def test_expected_sq_matches_hand_computation(tiny_vgg, example_input):
    from criteria.similarity import following_norms, group_distances

    ctx = context(tiny_vgg, example_input)
    group = ctx.group("features.4")
    d, _ = group_distances(ctx, [group], "expected_sq", following_norms(tiny_vgg, example_input))["features.4"]
    w = tiny_vgg.features[4].weight.detach().double().flatten(1)
    gamma, beta = tiny_vgg.features[5].weight.detach().double(), tiny_vgg.features[5].bias.detach().double()
    for i, j in [(0, 1), (5, 77), (127, 3)]:
        cos = float(w[i] @ w[j] / (w[i].norm() * w[j].norm()))
        d2 = (beta[i] - beta[j]) ** 2 + gamma[i] ** 2 + gamma[j] ** 2 - 2 * gamma[i] * gamma[j] * cos
        assert d[i, j] == pytest.approx(float(d2) ** 0.5, rel=1e-9)
        assert d[i, j] == d[j, i]
    # w2_bn ignores the weights: (beta_i - beta_j)^2 + (|gamma_i| - |gamma_j|)^2
    d, _ = group_distances(ctx, [group], "w2_bn", following_norms(tiny_vgg, example_input))["features.4"]
    assert d[5, 77] == pytest.approx(float((beta[5] - beta[77]) ** 2 + (gamma[5] - gamma[77]) ** 2) ** 0.5)


def test_negative_gamma_uses_signed_formula(tiny_vgg, example_input):
    from criteria.similarity import following_norms, group_distances

    duplicate_channel(tiny_vgg, "features.4", "features.5", 3, 7)
    with torch.no_grad():  # y_7 = -y_3 + 2 beta: far apart although |gamma| and the filter are equal
        tiny_vgg.features[5].weight[7] *= -1
    ctx = context(tiny_vgg, example_input)
    d, _ = group_distances(ctx, [ctx.group("features.4")], "expected_sq", following_norms(tiny_vgg, example_input))[
        "features.4"
    ]
    assert d[3, 7] == pytest.approx(2 * abs(float(tiny_vgg.features[5].weight[3].detach())))


def test_identical_channels_merge_without_changing_the_output(tiny_vgg, example_input):
    duplicate_channel(tiny_vgg, "features.4", "features.5", 3, 7)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, reference_features = tiny_vgg(x), tiny_vgg.features(x)
    # the smallest possible target on that group alone: exactly one channel goes, the duplicate (distance 0)
    ctx = context(tiny_vgg, example_input, target=1e-4, only={"features.4"})
    result = run(ctx)
    kept = set(result.keep["features.4"].tolist())
    assert len(kept) == 127 and len(kept & {3, 7}) == 1
    merged = prune(tiny_vgg, example_input, result.keep, result.overrides)
    plain = prune(tiny_vgg, example_input, result.keep)
    with torch.no_grad():
        assert torch.allclose(merged(x), reference, atol=1e-6, rtol=1e-4)
        merged_error = (merged.features(x) - reference_features).abs().max()
        plain_error = (plain.features(x) - reference_features).abs().max()
    assert merged_error < 1e-5 * reference_features.abs().max()
    # without the merge the removed channel's signal is lost (one channel of 128 in a random network: small)
    assert plain_error > 1e-3 * reference_features.abs().max() and plain_error > 100 * merged_error
    # at the default 50% target the pair still ends in one cluster: exactly one of them is kept
    kept = set(run(context(tiny_vgg, example_input)).keep["features.4"].tolist())
    assert len(kept & {3, 7}) == 1


def test_merge_none_has_no_overrides(tiny_resnet, example_input):
    result = run(context(tiny_resnet, example_input), merge="none")
    assert result.keep and not result.overrides


def test_residual_groups_cluster_jointly(tiny_resnet, example_input):
    ctx = context(tiny_resnet, example_input, scope="all")
    result = run(ctx)
    assert "conv1" in result.keep and "layer2.0.conv2" in result.keep
    _, overrides, report = plan_from_result(result, ctx, PruneJob(target=Target("macs", 0.5), scope="all"))
    assert 0.5 <= report["achieved"] < 0.53
    assert prune(tiny_resnet, example_input, result.keep, overrides)(example_input).shape == (1, 10)


def test_empirical_distance_needs_data_and_sees_duplicates(tiny_resnet, example_input, digits_calib):
    cls = get_criterion("similarity")
    assert cls().needs == frozenset() and cls(cls.Options(distance="empirical")).needs == {"data"}
    duplicate_channel(tiny_resnet, "layer2.1.conv1", "layer2.1.bn1", 4, 9)
    x, y = digits_calib
    calib = CalibData(x[:64].repeat(1, 3, 1, 1), y[:64])
    ctx = context(tiny_resnet, example_input, calib=calib)
    from criteria.similarity import following_norms, group_distances

    group = ctx.group("layer2.1.conv1")
    d, _ = group_distances(ctx, [group], "empirical", following_norms(tiny_resnet, example_input))[group.id]
    assert d[4, 9] == pytest.approx(0, abs=1e-6) and np.median(d) > 0.1
    result = run(ctx, distance="empirical")
    assert len(set(result.keep["layer2.1.conv1"].tolist()) & {4, 9}) == 1


def test_following_norms_are_the_batchnorms_each_conv_feeds_on_densenet():
    """densenet's BatchNorms read concatenations made after earlier conv outputs were freed; a reused tensor id once
    paired a 32-channel conv with a 992-channel BatchNorm (and LASSO's refit then failed on the shapes)."""
    from criteria.similarity import following_norms

    model = models.create_model("torchvision:densenet121", num_classes=10).eval()
    follow = following_norms(model, torch.randn(1, 3, 32, 32))
    modules = dict(model.named_modules())
    assert follow["features.conv0"] == "features.norm0"
    assert follow["features.denseblock1.denselayer1.conv1"] == "features.denseblock1.denselayer1.norm2"
    for conv, bn in follow.items():
        assert modules[bn].num_features == modules[conv].out_channels, (conv, bn)
    # a dense layer's conv2 feeds a concatenation, never a BatchNorm directly
    assert not any(name.endswith("conv2") for name in follow)
