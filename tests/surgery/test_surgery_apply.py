"""Physical removal: it equals zeroing, keeps names, costs what the cost model predicts, reloads, exports, and
matches Torch-Pruning's counts for the same plan."""

import copy

import pytest
import torch
from helpers import concat_net, randomise_bn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import models
from prune_cli.errors import PruneCliError
from prune_cli.metrics import count_macs, count_params
from prune_cli.store.modelfile import load_model, save_model
from prune_cli.surgery import CostModel, channel_groups, prune

ARCHS = {
    "vgg11": lambda: models.create_model("vgg11"),
    "resnet20": lambda: models.create_model("resnet20"),
    "resnet50": lambda: models.create_model("resnet50"),
    "tv_mobilenet_v2": lambda: models.create_model("torchvision:mobilenet_v2", num_classes=10),
    # squeeze-and-excitation (a channel-wise product) and stochastic depth, which fx could not trace
    "tv_efficientnet_b0": lambda: models.create_model("torchvision:efficientnet_b0", num_classes=10),
    "concat_net": concat_net,
    # upsampling between convs (decoders, feature pyramids): channels pass, the next conv runs on the larger map
    "upsample_net": lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.Mish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 10),
    ),  # fmt: skip
}
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def random_plan(groups, seed: int, p_prune: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for gr in groups:
        if gr.prunable and torch.rand(1, generator=g) < p_prune:
            k = int(torch.randint(1, gr.size + 1, (1,), generator=g))
            plan[gr.id] = torch.randperm(gr.size, generator=g)[:k].sort().values
    return plan


def zeroed(model, groups, plan):
    """The same model with the removed channels' outputs forced to exactly 0 (producers and BN weight/bias)."""
    z = copy.deepcopy(model)
    mods = dict(z.named_modules())
    by_id = {g.id: g for g in groups}
    with torch.no_grad():
        for gid, idx in plan.items():
            removed = torch.ones(by_id[gid].size, dtype=torch.bool)
            removed[idx] = False
            for m in by_id[gid].members:
                mod = mods[m.module]
                if m.kind in ("conv_out", "linear_out", "depthwise", "bn"):
                    at = removed.nonzero().flatten() + m.offset  # a BN after a concatenation holds a slice
                    mod.weight[at] = 0
                    if mod.bias is not None:
                        mod.bias[at] = 0
    return z


@pytest.mark.parametrize("arch", ARCHS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000))
def test_removal_equals_zeroing(arch, seed):
    model = randomise_bn(ARCHS[arch]())
    groups = channel_groups(model, X[:1])
    plan = random_plan(groups, seed)
    pruned = prune(model, X[:1], plan, groups=groups)
    with torch.no_grad():
        assert torch.allclose(pruned(X), zeroed(model, groups, plan)(X), atol=1e-5, rtol=1e-4)
    # names preserved, original untouched, cost as predicted
    assert {n for n, _ in pruned.named_modules()} == {n for n, _ in model.named_modules()}
    macs, params = CostModel(model, X[:1]).cost({k: len(v) for k, v in plan.items()})
    assert count_macs(pruned, X[:1]) == macs and count_params(pruned) == params


# concatenation everywhere, with BatchNorm over concatenated channels (densenet) and parallel branches (inception);
# each at the smallest input its poolings allow (googlenet and inception_v3 come without their auxiliary heads)
CONCAT_ARCHS = {"densenet121": 32, "googlenet": 32, "inception_v3": 80}


@pytest.mark.parametrize("name", CONCAT_ARCHS)
def test_removal_equals_zeroing_on_concatenating_models(name):
    torch.manual_seed(0)
    model = randomise_bn(models.create_model(f"torchvision:{name}", num_classes=10)).eval()
    x = torch.randn(2, 3, CONCAT_ARCHS[name], CONCAT_ARCHS[name], generator=torch.Generator().manual_seed(2))
    groups = channel_groups(model, x[:1])
    plan = random_plan(groups, seed=0)
    pruned = prune(model, x[:1], plan, groups=groups)
    with torch.no_grad():
        got, want = pruned(x), zeroed(model, groups, plan)(x)
    # relative to the outputs' scale: inception_v3's own initialisation with random BatchNorm reaches 1e4-1e5
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    macs, params = CostModel(model, x[:1]).cost({k: len(v) for k, v in plan.items()})
    assert count_macs(pruned, x[:1]) == macs and count_params(pruned) == params


@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_everything_is_the_identity(arch):
    model = randomise_bn(ARCHS[arch]())
    groups = channel_groups(model, X[:1])
    pruned = prune(model, X[:1], {g.id: torch.arange(g.size) for g in groups if g.prunable}, groups=groups)
    with torch.no_grad():
        assert torch.equal(pruned(X), model(X))


def test_original_is_untouched_and_pruned_is_smaller(tiny_resnet):
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    groups = channel_groups(tiny_resnet, X[:1])
    feeds_fc = next(g for g in groups if any(m.module == "fc" for m in g.members))  # fc: inputs cut, bias not
    plan = {"layer1.0.conv1": torch.tensor([0, 3, 5]), feeds_fc.id: torch.arange(0, feeds_fc.size, 2)}
    pruned = prune(tiny_resnet, X[:1], plan, groups=groups)
    assert all(torch.equal(before[k], v) for k, v in tiny_resnet.state_dict().items())
    assert pruned.layer1[0].conv1.out_channels == 3 and pruned.layer1[0].bn1.num_features == 3
    assert pruned.layer1[0].conv2.in_channels == 3 and tiny_resnet.layer1[0].conv1.out_channels == 16
    # no tensor of the copy shares memory with the original
    originals = {t.data_ptr() for t in tiny_resnet.state_dict().values()}
    assert not originals & {t.data_ptr() for t in pruned.state_dict().values()}


def test_tied_weights_are_refused():
    """Two convs sharing one weight tensor cannot both get their own slice: a clear error, not a wrong model."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))  # fmt: skip
    net[4].weight = net[2].weight
    with pytest.raises(PruneCliError, match="shared with another layer"):
        prune(net, X[:1], {"2": torch.tensor([0, 1, 2])})


def test_saved_pruned_model_reloads_identically_and_exports(tiny_resnet, tmp_path):
    groups = channel_groups(tiny_resnet, X[:1])
    pruned = prune(tiny_resnet, X[:1], random_plan(groups, 3, p_prune=1.0), groups=groups)
    loaded = load_model(save_model(pruned, tmp_path / "p.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
        traced = torch.jit.trace(loaded, X)
        assert torch.allclose(traced(X), pruned(X), atol=1e-6)
    exported = torch.export.export(loaded, (X,))
    assert torch.allclose(exported.module()(X), pruned(X), atol=1e-5)


def test_overrides_and_bad_plans(tiny_vgg):
    groups = channel_groups(tiny_vgg, X[:1])
    new_w = torch.ones(2, 3, 3, 3)
    pruned = prune(tiny_vgg, X[:1], {"features.0": torch.tensor([1, 2])}, {"features.0.weight": new_w}, groups=groups)
    assert torch.equal(pruned.features[0].weight, new_w)
    bad = [
        ({"nope": torch.tensor([0])}, "unknown channel group"),
        ({"features.0": torch.tensor([], dtype=torch.long)}, "keeps no channel"),
        ({"features.0": torch.tensor([3, 1])}, "sorted"),
        ({"features.0": torch.tensor([64])}, "outside"),
        ({"classifier.4": torch.tensor([0])}, "not prunable"),
    ]
    for plan, message in bad:
        with pytest.raises(PruneCliError, match=message):
            prune(tiny_vgg, X[:1], plan, groups=groups)
    with pytest.raises(PruneCliError, match="shape"):
        prune(tiny_vgg, X[:1], {"features.0": torch.tensor([1])}, {"features.0.weight": new_w}, groups=groups)


@pytest.mark.parametrize("arch", ["vgg11", "resnet20", "resnet50"])
def test_counts_equal_torch_pruning_for_the_same_plan(arch):
    """Torch-Pruning 1.6.1 as an oracle: same plan, its own removal -> same params and MACs as ours."""
    tp = pytest.importorskip("torch_pruning")
    model = ARCHS[arch]().eval()
    groups = channel_groups(model, X[:1])
    plan = random_plan([g for g in groups if g.prunable], 7, p_prune=0.5)
    ours = prune(model, X[:1], plan, groups=groups)
    theirs = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(theirs, example_inputs=X[:1], verbose=False)
    modules = dict(theirs.named_modules())
    by_id = {g.id: g for g in groups}
    for gid, idx in plan.items():
        removed = sorted(set(range(by_id[gid].size)) - set(idx.tolist()))
        producer = modules[by_id[gid].producers[0].module]
        fn = tp.prune_conv_out_channels if isinstance(producer, nn.Conv2d) else tp.prune_linear_out_channels
        dg.get_pruning_group(producer, fn, idxs=removed).prune()
    assert count_params(ours) == count_params(theirs)
    assert count_macs(ours, X[:1]) == count_macs(theirs, X[:1])
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), atol=1e-5)


def _li_vgg16_pruned_a():
    model = models.create_model("vgg16")
    x = torch.randn(1, 3, 32, 32)
    groups = [g for g in channel_groups(model, x) if g.prunable and g.id.startswith("features")]
    widths = [32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256]  # methods_static.md 1(c)
    plan = {g.id: torch.arange(w) for g, w in zip(groups, widths, strict=True)}
    return model, x, plan


def test_li_vgg16_pruned_a_macs_reduction():
    """Li et al. Table 1: VGG-16 pruned-A removes 34.2% of MACs (3.13e8 -> 2.06e8)."""
    model, x, plan = _li_vgg16_pruned_a()
    pruned = prune(model, x, plan)
    reduction = 1 - count_macs(pruned, x) / count_macs(model, x)
    assert reduction == pytest.approx(0.342, abs=0.005)


def test_li_resnet56_pruned_b_macs():
    """Li et al. ResNet-56-B: first convs of blocks pruned 60/30/10% per stage, conv ids {16,18,20,34,38,54}
    skipped (ids from 1 = stem; block b's first conv is 2 + 2b): 9.09e7 MACs with zero-padding shortcuts. Ours adds
    the two projection shortcuts (262,144 MACs), so we check 9.09e7 + 0.26e6 within 1%."""
    model = models.create_model("resnet56")
    x = torch.randn(1, 3, 32, 32)
    plan = {}
    for b in range(27):
        conv_id, stage = 2 + 2 * b, b // 9
        if conv_id in {16, 18, 20, 34, 38, 54}:
            continue
        width = 16 * 2**stage
        plan[f"layer{stage + 1}.{b % 9}.conv1"] = torch.arange(int(width * (1 - (0.6, 0.3, 0.1)[stage])))
    macs = count_macs(prune(model, x, plan), x)
    assert macs == pytest.approx(9.09e7 + 262_144, rel=0.01)


def test_copy_module_copies_like_deepcopy():
    """prune()'s copy: the same state, hooks and extra attributes as copy.deepcopy, nothing shared with the
    original, sharing inside the model kept (a module used twice, a tied weight), and a module type with its own
    copy protocol still copied by it."""
    from prune_cli.surgery.apply import copy_module

    class OwnCopy(nn.Identity):
        def __deepcopy__(self, memo):
            return OwnCopy()

    shared = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.ReLU(), shared, OwnCopy(), nn.Conv2d(4, 4, 1))
    net[5].bias = shared.bias  # a tied parameter
    net.notes = ["a", {"b": 1}]
    net.register_buffer("mask", torch.ones(4))
    calls = []
    net[0].register_forward_hook(lambda m, a, o: calls.append(1))

    new = copy_module(net, {})
    assert type(new) is nn.Sequential and new is not net
    assert new[1] is new[3] and new[1] is not shared
    assert new[5].bias is new[1].bias
    assert isinstance(new[4], OwnCopy)
    assert new.notes == net.notes and new.notes is not net.notes and new.notes[1] is not net.notes[1]
    old_state, new_state = net.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    assert list(old_state) == list(new_state)
    for k, v in old_state.items():
        w = new_state[k]
        assert torch.equal(v, w) and v.data_ptr() != w.data_ptr() and type(v) is type(w)
        assert v.requires_grad == w.requires_grad
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(new(x), net(x))
    assert calls == [1, 1]  # the hook came along
    assert new.training == net.training
