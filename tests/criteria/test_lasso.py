"""LASSO channel selection with least-squares reconstruction (He et al., arXiv 1707.06168)."""

import pytest
import torch
import torch.nn.functional as F

import models
from criteria.lasso import LassoOptions, _shortcut_operands
from prune_cli.api import CalibData, Context, Plan, Target, check_result, get_criterion
from prune_cli.errors import BadValue
from prune_cli.run.pruning import PruneJob, plan_from_result
from prune_cli.surgery import channel_groups, prune
from prune_cli.testing import make_context

SMALL = {"images": 48}  # fast settings for the conformance tests


def small_images(digits_calib, channels=3, size=16):
    x, y = digits_calib
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x.repeat(1, channels, 1, 1), y


def context(model, calib, target=0.5, scope="internal", progress=None):
    return make_context(model, calib=calib, target=target, scope=scope, progress=progress)


def run(ctx, **options):
    cls = get_criterion("lasso")
    criterion = cls(cls.Options(**options))
    return check_result(criterion.run(ctx), ctx.groups), criterion


@pytest.mark.parametrize("arch,scope", [("tiny_vgg", "internal"), ("tiny_resnet", "internal"), ("tiny_resnet", "all")])
def test_plan_meets_target_and_prunes(arch, scope, request, digits_calib):
    model = request.getfixturevalue(arch)
    calib = CalibData(*small_images(digits_calib))
    calls = []
    ctx = context(model, calib, scope=scope, progress=lambda label, total: lambda n=1: calls.append((label, total, n)))
    result, criterion = run(ctx, **SMALL, lasso_rows=50 if arch == "tiny_vgg" else 100)
    assert isinstance(result, Plan) and result.keep and result.overrides
    if arch == "tiny_vgg":  # the groups read by Linear layers are refit too (bias included)
        assert {"classifier.1.weight", "classifier.1.bias", "classifier.4.weight"} <= result.overrides.keys()
    assert len(calls) == len(result.keep) and calls[0][1] == len(result.keep)  # one progress step per group
    keep, overrides, report = plan_from_result(result, ctx, PruneJob(target=Target("macs", 0.5), scope=scope))
    assert 0.5 <= report["achieved"] < 0.53
    pruned = prune(model, ctx.example_input, keep, overrides)
    assert pruned(calib.x[:2]).shape == (2, 10)
    for gid, idx in keep.items():
        assert pruned.get_submodule(ctx.group(gid).producers[0].module).weight.shape[0] == len(idx)
    assert all(r["after"] <= r["before"] + 1e-9 for r in criterion.report.values())  # LS never worse on its samples


def test_deterministic_for_a_seed(tiny_resnet, digits_calib):
    calib = CalibData(*small_images(digits_calib))
    a, _ = run(context(tiny_resnet, calib), **SMALL, lasso_rows=100)
    b, _ = run(context(tiny_resnet, calib), **SMALL, lasso_rows=100)
    assert all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep) and a.keep.keys() == b.keep.keys()
    assert a.overrides.keys() == b.overrides.keys()
    assert all(torch.equal(a.overrides[k], b.overrides[k]) for k in a.overrides)


def test_needs_data():
    assert get_criterion("lasso").needs == {"data"}


def test_picks_the_channels_the_output_depends_on(tiny_resnet, digits_calib):
    """layer2.1.conv2 reads (almost) only k known channels of its 32 inputs: the LASSO finds exactly those."""
    from criteria.similarity import uniform_counts

    calib = CalibData(*small_images(digits_calib))
    ctx = context(tiny_resnet, calib, target=0.05)
    ctx = Context(**{**ctx.__dict__, "groups": tuple(g for g in ctx.groups if g.id == "layer2.1.conv1")})
    k = uniform_counts(ctx)["layer2.1.conv1"]
    assert 8 <= k < 32
    known = torch.randperm(32, generator=torch.Generator().manual_seed(3))[:k].sort().values
    with torch.no_grad():
        w = tiny_resnet.layer2[1].conv2.weight
        others = torch.ones(32, dtype=torch.bool)
        others[known] = False
        w[:, others] *= 1e-3
        # A random BN can leave a known channel dead after the ReLU, and then the output rightly does not depend
        # on it: keep the known channels alive so that the answer does not hang on the random model.
        tiny_resnet.layer2[1].bn1.bias[known] = tiny_resnet.layer2[1].bn1.bias[known].abs() + 1.0
    result, criterion = run(ctx, images=64)
    assert torch.equal(result.keep["layer2.1.conv1"], known)
    assert criterion.report["layer2.1.conv2"]["after"] < 1e-4


@pytest.fixture(scope="module")
def trained_resnet(digits_calib):
    """resnet20 on 16x16 digits, 80 SGD steps (~5 s on one core): a model whose channels carry real structure."""
    from prune_cli.data import splits as D

    splits = D.make_splits(D.load_dataset("digits"), seed=0)
    x = F.interpolate(D.to_float(splits.train.x, splits), size=16, mode="bilinear", antialias=True)
    y = splits.train.y
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, 768, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[768:]).argmax(1) == y[768:]).float().mean())
    assert accuracy > 0.6  # it learned something (held-out part of the training split)
    return model, x, y


def held_out_errors(model, keep, overrides, fit_images, test_images):
    """Per refit consumer: squared error of its (BN) output on held-out images against the original model, with the
    refit and with the same channels but this layer's original weights (every other refit kept)."""
    from criteria.similarity import following_norms

    follow = following_norms(model, test_images[:1])
    groups = channel_groups(model, test_images[:1])
    refit = sorted({k.rsplit(".", 1)[0] for k in overrides if k.endswith(".weight")})
    full = prune(model, fit_images[:1], keep, overrides)
    errors = {}
    for name in refit:
        site = follow.get(name, name)
        own = {f"{name}.weight", f"{name}.bias", f"{site}.running_mean"}
        plain = prune(model, fit_images[:1], keep, {k: v for k, v in overrides.items() if k not in own})
        rows = None
        for h in groups:
            if h.id in keep and any(m.module == name and m.kind in ("conv_out", "linear_out") for m in h.members):
                rows = keep[h.id]
        outs = {}
        for label, net in (("original", model), ("refit", full), ("plain", plain)):
            captured = []
            handle = net.get_submodule(site).register_forward_hook(lambda _m, _a, out, c=captured: c.append(out))
            with torch.no_grad():
                net(test_images)
            handle.remove()
            outs[label] = captured[0] if label != "original" or rows is None else captured[0][:, rows]
        errors[name] = tuple(float((outs[k] - outs["original"]).pow(2).sum()) for k in ("refit", "plain"))
    return errors


def test_refit_beats_the_same_channels_without_refit_on_a_trained_model(trained_resnet):
    model, x, y = trained_resnet
    calib = CalibData(x[:256], y[:256])
    ctx = context(model, calib)
    # the layer-wise refit (its target is this layer's original output); all 256 images x 10 positions, 400 rows
    result, criterion = run(ctx, refit="layer")
    errors = held_out_errors(model, result.keep, result.overrides, x[:1], x[768:1024])
    assert len(errors) == 9  # every block's conv2
    for name, (refit, plain) in errors.items():
        assert refit < plain, (name, refit, plain)
    # and on average by a clear margin
    assert sum(r / p for r, p in errors.values()) / len(errors) < 0.8


def test_refit_beats_no_refit_on_a_random_model(tiny_resnet, digits_calib):
    """Fast variant (random weights, randomised BN statistics), more samples than unknowns in every refit."""
    x, y = small_images(digits_calib)
    calib = CalibData(x[:128], y[:128])
    result, _ = run(context(tiny_resnet, calib), images=128, lasso_rows=100, refit="layer")
    errors = held_out_errors(tiny_resnet, result.keep, result.overrides, x[:1], x[128:192])
    assert len(errors) == 9
    for name, (refit, plain) in errors.items():
        assert refit < plain, (name, refit, plain)


# ------------------------------------------------ refit=residual: the block's last conv absorbs the shortcut's drift
def test_refit_option_values():
    assert LassoOptions().refit == "residual"
    assert LassoOptions(refit=True).refit == "layer" and LassoOptions(refit=False).refit == "none"
    assert LassoOptions(refit="residual").refit == "residual"
    with pytest.raises(BadValue):
        LassoOptions(refit="sum")


def test_shortcut_operands_are_the_tensors_added_to_each_block_branch():
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    sites = {n for n, _ in model.named_modules() if n.endswith(("bn1", "bn2"))}
    found = _shortcut_operands(model, x, sites)
    assert sorted(found) == sorted(f"layer{i}.{j}.bn2" for i in (1, 2, 3) for j in range(3))  # not bn1, not the stem
    seen = {}
    sources = {"identity": model.layer1[0], "projection": model.layer2[0].shortcut}
    hooks = [m.register_forward_hook(lambda _m, _a, out, k=k: seen.__setitem__(k, out)) for k, m in sources.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(found["layer1.1.bn2"], seen["identity"])  # identity shortcut: the previous block's output
    assert torch.equal(found["layer2.0.bn2"], seen["projection"])  # projection shortcut: its conv + BN


def _pruned(model, x, y, refit):
    ctx = context(model, CalibData(x[:256], y[:256]))
    result, _ = run(ctx, refit=refit)
    return prune(model, x[:1], result.keep, result.overrides)


def _block_outputs(model, x):
    """({block name: its output (N, C, H, W)}, logits (N, classes)) on images x."""
    outs = {}
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    hooks = [
        model.get_submodule(k).register_forward_hook(lambda _m, _a, out, k=k: outs.__setitem__(k, out)) for k in blocks
    ]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return outs, logits


def test_residual_refit_keeps_the_block_outputs_closer_to_the_original(trained_resnet):
    """Held-out images: each block's last conv absorbs part of the error that the shortcut brings from earlier
    blocks, so the deep blocks and the logits end closer to the original model's than with the layer-wise refit."""
    model, x, y = trained_resnet
    held_out = x[768:1024]
    original, logits = _block_outputs(model, held_out)
    errors = {}
    for refit in ("layer", "residual"):
        outs, out_logits = _block_outputs(_pruned(model, x, y, refit), held_out)
        rel = {k: float((outs[k] - original[k]).pow(2).sum() / original[k].pow(2).sum()) for k in original}
        errors[refit] = (rel, float((out_logits - logits).pow(2).sum() / logits.pow(2).sum()))
    layer, residual = errors["layer"], errors["residual"]
    deep = [f"layer3.{j}" for j in range(3)]
    assert all(residual[0][k] < layer[0][k] for k in deep), (layer[0], residual[0])
    assert residual[1] < layer[1], (layer[1], residual[1])


def test_residual_target_is_the_shortcut_drift_over_the_batchnorm_scale(tiny_resnet, digits_calib):
    """A current model whose projection shortcut is shifted by delta per channel: layer2.0.conv2's target moves by
    exactly -delta / a at every sample (a = its BatchNorm's scale), so that the refit block's sum equals the
    original sum; the layer-wise target does not move."""
    import copy

    from criteria.lasso import _bn_scale, _sample

    x, y = small_images(digits_calib)
    ctx = context(tiny_resnet, CalibData(x[:64], y[:64]))
    current = copy.deepcopy(tiny_resnet)
    delta = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        current.layer2[0].shortcut[1].bias += delta  # the shortcut's output shifts by exactly delta
    consumers = list(ctx.group("layer2.0.conv1").consumers)
    rows = {c.module: None for c in consumers}
    o = LassoOptions(points=4)
    plain = _sample(tiny_resnet, current, consumers, rows, x[:64], o, ctx, salt=0)
    drifted = _sample(tiny_resnet, current, consumers, rows, x[:64], o, ctx, salt=0,
                      residual={"layer2.0.conv2": "layer2.0.bn2"})  # fmt: skip
    a = _bn_scale(current, "layer2.0.bn2")
    moved = (drifted["layer2.0.conv2"].y - plain["layer2.0.conv2"].y) * a
    assert torch.equal(drifted["layer2.0.conv2"].x, plain["layer2.0.conv2"].x)  # the same samples
    assert torch.allclose(moved, -delta.expand_as(moved), atol=1e-4)
