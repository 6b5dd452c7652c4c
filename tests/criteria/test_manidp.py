"""ManiDP (arXiv 2103.05861): gates, batch-1 skipping, per-input MACs, losses, thresholds, hooks, save/reload."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import models
from criteria.manidp import THRESHOLD_INIT, GatedBlock, GatedConv2d, InputGatedConv2d, gated_layers, wrap
from criteria.manidp.train import (
    ManiDPHooks,
    fit_thresholds,
    fit_to_macs,
    instance_weights,
    manifold_loss,
    remain_rate,
    sparsity_loss,
)
from prune_cli.api import CalibData, Context, Dynamic, Target, check_result, get_criterion
from prune_cli.api.dynamic import per_input_macs
from prune_cli.errors import BadValue
from prune_cli.metrics import count_macs
from prune_cli.store.modelfile import load_model, save_model

IDENTITY = {"criterion": "manidp", "gate_init": "identity"}


def gated(model, config=IDENTITY):
    return wrap(copy.deepcopy(model), config).eval()


def set_constant_gates(model, seed=0, threshold=0.5):
    """pi_c = relu(b2_c) for every input (w2 = 0); channels with b2 >= threshold are kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in gated_layers(model):
            conv.gate.w2.zero_()
            conv.gate.b2.copy_(torch.rand(conv.out_channels, generator=g) * 1.5)
            conv.gate.threshold.fill_(threshold)


def set_random_gates(model, seed=0, threshold=1.0):
    """Input-dependent saliencies around 1 (moderate, so that activations stay in range)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in gated_layers(model):
            conv.gate.w1.copy_(torch.randn(conv.gate.w1.shape, generator=g) * 0.3)
            conv.gate.w2.copy_(torch.randn(conv.gate.w2.shape, generator=g) * 0.3)
            conv.gate.threshold.fill_(threshold)


@pytest.mark.parametrize("fixture", ["tiny_resnet", "tiny_vgg"])
def test_gates_with_every_saliency_kept_reproduce_the_base_model(fixture, request):
    base = request.getfixturevalue(fixture)
    model = gated(base)  # identity init: pi = relu(0 * h + 1) = 1 exactly, and the threshold is -10000
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        # the compact batch-1 path, nothing to skip; BatchNorm is folded into the convs: equal up to rounding
        torch.testing.assert_close(model(x[:1]), base(x[:1]), rtol=1e-5, atol=1e-5)
    total, overhead = per_input_macs(model, x)
    assert torch.equal(total - overhead, torch.full((4,), float(count_macs(base, x[:1])), dtype=torch.float64))
    assert torch.all(overhead > 0)


def test_gate_sites_resnet_and_vgg(tiny_resnet, tiny_vgg):
    r = gated(tiny_resnet)
    names = [n for n, m in r.named_modules() if isinstance(m, GatedConv2d)]
    assert len(names) == 18 and names[:2] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert r.layer1[0].conv2.prev is r.layer1[0].conv1 and r.layer1[0].conv1.prev is None
    assert type(r.layer2[0].bn2) is nn.BatchNorm2d and len(r.layer2[0].bn2._forward_hooks) == 1  # masks via a hook
    assert type(r.conv1) is nn.Conv2d and not r.bn1._forward_hooks  # the stem is never gated
    assert type(r.layer2[0].shortcut[0]) is nn.Conv2d and type(r.fc) is nn.Linear
    v = gated(tiny_vgg)
    convs = [m for m in v.features if isinstance(m, nn.Conv2d)]
    assert type(convs[0]) is nn.Conv2d and all(isinstance(c, GatedConv2d) for c in convs[1:])
    assert convs[1].prev is None and convs[2].prev is convs[1]


def test_bottleneck_blocks_are_gated_on_the_dense_path():
    """The sites come from the structure: a bottleneck's three convs are gated (its shortcut and the stem are not);
    there is no compact block for it, so batch 1 runs the dense masked path, equal to the batched one."""
    torch.manual_seed(0)
    base = models.create_model("resnet50", num_classes=4).eval()
    model = gated(base).double()
    block = model.layer1[0]
    assert [type(getattr(block, c)) for c in ("conv1", "conv2", "conv3")] == [GatedConv2d] * 3
    assert block.conv3.prev is block.conv2 and block.conv2.prev is block.conv1
    assert type(block.shortcut[0]) is nn.Conv2d and type(model.conv1) is nn.Conv2d
    set_random_gates(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    single, batched, single_macs, macs = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs) and bool((macs < count_macs(base, x[:1].float())).all())


def test_torchvision_resnet18_is_gated_and_runs_compact():
    """Beyond the zoo: torchvision's ResNet-18 gets the gates of prune-cli's basic-block ResNets (both convs of each
    block; not the stem, not the downsample projections), its blocks run compact at batch 1, and the per-input MACs
    of the batch-1 path equal the batched masking's."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=2).eval()
    model = gated(base)
    names = [n for n, m in model.named_modules() if isinstance(m, GatedConv2d)]
    assert len(names) == 16 and names[:2] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert not any("downsample" in n for n in names) and type(model.conv1) is nn.Conv2d
    assert isinstance(model.layer2[0], GatedBlock) and model.layer2[0].conv2.prev is model.layer2[0].conv1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # identity gates: the base model exactly (batched), up to the folded BatchNorm (batch 1)
        assert torch.equal(model(x), base(x))
        torch.testing.assert_close(model(x[:1]), base(x[:1]), rtol=1e-4, atol=1e-4)
    model = model.double()
    set_random_gates(model)
    single, batched, single_macs, macs = _single_vs_batched(model, x.double())
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)
    assert bool((macs < count_macs(base, x[:1])).all())  # channels were skipped
    assert sum(c.slice_misses for c in gated_layers(model)) > 0  # the compact path ran


def test_saliency_scaled_mask_by_hand(tiny_resnet):
    model = gated(tiny_resnet)
    set_constant_gates(model)
    x = torch.randn(2, 3, 16, 16)
    conv = model.layer1[0].conv1
    relu_out = []
    with torch.no_grad():
        model(x)
        b2 = conv.gate.b2
        want = torch.where(b2 >= 0.5, b2, torch.zeros_like(b2))
        assert torch.equal(conv.last_mask, want.expand(2, -1))
        # the block's first output: relu(bn(conv(x)) * m)
        ref = F.relu(tiny_resnet.layer1[0].bn1(tiny_resnet.layer1[0].conv1(torch.relu(tiny_resnet.bn1(
            tiny_resnet.conv1(x)))))) * want[None, :, None, None]  # fmt: skip
        h = model.layer1[0].conv2.register_forward_pre_hook(lambda m, a: relu_out.append(a[0]))
        model(x)
        h.remove()
    assert torch.allclose(relu_out[0], ref, atol=1e-6)


def test_per_input_macs_by_hand(tiny_resnet):
    model = gated(tiny_resnet)
    set_constant_gates(model)
    x = torch.randn(3, 3, 16, 16)
    total, overhead = per_input_macs(model, x)
    sizes = _spatial_sizes(model, x[:1])
    want_total, want_over = float(count_macs(tiny_resnet, x[:1])), 0.0
    for conv in gated_layers(model):
        k_out = int((conv.gate.b2 >= 0.5).sum())
        k_in = int((conv.prev.gate.b2 >= 0.5).sum()) if conv.prev is not None else conv.in_channels
        hw_in, hw_out = sizes[conv]
        want_total -= (conv.in_channels * conv.out_channels - k_in * k_out) * 9 * hw_out
        gate = conv.in_channels * hw_in + conv.gate.w1.numel() + conv.gate.w2.numel()  # pooling + 2 FCs
        want_over += gate + k_out * hw_out  # + scaling of the kept channels
    assert torch.equal(overhead, torch.full((3,), want_over, dtype=torch.float64))
    assert torch.equal(total, torch.full((3,), want_total + want_over, dtype=torch.float64))


INTERNAL = {**IDENTITY, "residual_gates": False}


def test_internal_scope_leaves_the_residual_stream_whole(tiny_resnet):
    """residual_gates false (`--scope internal`): each block's conv1 is gated, its conv2 only reads conv1's kept
    channels and keeps all its outputs (no mask on bn2); batch 1 runs compact and equals the batched masking; the
    MACs count conv2's kept inputs (checked by hand) and no overhead for it."""
    model = gated(tiny_resnet, INTERNAL).double()
    block = model.layer2[0]
    assert [n for n, m in model.named_modules() if isinstance(m, GatedConv2d)][:2] == [
        "layer1.0.conv1",
        "layer1.1.conv1",
    ]
    assert len(gated_layers(model)) == 9 and type(block.conv2) is InputGatedConv2d and block.conv2.prev is block.conv1
    assert not block.bn2._forward_hooks and isinstance(block, GatedBlock)
    set_constant_gates(model)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    single, batched, single_macs, macs = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)
    sizes = _spatial_sizes(model, x[:1])
    want, over = float(count_macs(tiny_resnet, x[:1].float())), 0.0
    for conv in gated_layers(model):
        k_out = int((conv.gate.b2 >= 0.5).sum())
        want -= (conv.out_channels - k_out) * conv.in_channels * 9 * sizes[conv][1]
        over += conv.in_channels * sizes[conv][0] + conv.gate.w1.numel() + conv.gate.w2.numel() + k_out * sizes[conv][1]
    for conv in (m for m in model.modules() if isinstance(m, InputGatedConv2d)):
        k_in = int((conv.prev.gate.b2 >= 0.5).sum())
        want -= (conv.in_channels - k_in) * conv.out_channels * 9 * sizes[conv][1]
    total, overhead = per_input_macs(model, x)
    assert torch.equal(overhead, torch.full((3,), over, dtype=torch.float64))
    assert torch.equal(total, torch.full((3,), want + over, dtype=torch.float64))
    for b in (model.layer1[0], block):  # conv1 keeping nothing: conv2 sees no input, its BatchNorm shift stays
        b.conv1.gate.threshold.fill_(1e9)
    single, batched, *_ = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())


def test_bottleneck_under_internal_scope_keeps_conv3_whole():
    torch.manual_seed(0)
    model = gated(models.create_model("resnet50", num_classes=4).eval(), INTERNAL).double()
    block = model.layer1[0]
    assert [type(getattr(block, c)) for c in ("conv1", "conv2", "conv3")] == [GatedConv2d] * 2 + [InputGatedConv2d]
    assert block.conv3.prev is block.conv2
    set_random_gates(model)
    single, batched, single_macs, macs = _single_vs_batched(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)


@pytest.mark.parametrize(("scope", "gated_convs"), [("internal", 9), ("all", 18)])
def test_manidp_follows_the_selection_scope(tiny_resnet, scope, gated_convs):
    """The gates go where the selection scope lets every criterion prune: the residual stream only under `all`; the
    choice is in the model's config, so the rebuilt model has the same gates."""
    from prune_cli.testing import make_context

    ctx = make_context(tiny_resnet, calib=(torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))), scope=scope)
    result = get_criterion("manidp")().run(ctx)
    assert len(gated_layers(result.model)) == gated_convs
    assert result.config["residual_gates"] is (scope == "all")
    rebuilt = get_criterion("manidp").rebuild(copy.deepcopy(tiny_resnet), result.config)
    assert len(gated_layers(rebuilt)) == gated_convs


def _spatial_sizes(model, x):
    """{conv: (input pixels, output pixels)} for every conv of `model`. Runs a batch of 2: at batch 1 the ResNet
    blocks run compact and do not call their gated convs."""
    x = torch.cat([x, x])
    sizes = {}
    hooks = [m.register_forward_hook(lambda m, a, o: sizes.__setitem__(m, (a[0][0, 0].numel(), o[0, 0].numel())))
             for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("fixture", ["tiny_resnet", "tiny_vgg"])
def test_batch_one_really_skips_and_matches_the_batched_masking(fixture, request):
    # float64: the scaled masks compound over the layers (random VGG activations reach ~1e10), and in float32 the
    # batched and the batch-1 convolutions round differently beyond any useful tolerance
    model = gated(request.getfixturevalue(fixture)).double()
    set_random_gates(model)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        batched, macs = model(x), per_input_macs(model, x)[0]
        single = torch.cat([model(x[i : i + 1]) for i in range(4)])
        single_macs = torch.cat([per_input_macs(model, x[i : i + 1])[0] for i in range(4)])
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)
    assert macs.max() < 0.8 * count_macs(request.getfixturevalue(fixture), x[:1].float())  # channels were masked
    # the batch-1 conv really ran on the kept channels only: its FLOPs shrink with the masks
    from torch.utils.flop_counter import FlopCounterMode

    conv = gated_layers(model)[1]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x[:1])
    executed = counter.get_flop_counts()["Global"][torch.ops.aten.convolution] // 2
    counted = sum(float(c.last_macs[0] - c.last_overhead[0]) for c in gated_layers(model))
    assert len(conv.last_kept) < conv.out_channels
    sizes = _spatial_sizes(model, x[:1])
    ungated = sum(
        sizes[m][1] * m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        for m in model.modules()
        if type(m) is nn.Conv2d
    )  # fmt: skip  (stem, shortcuts)
    assert executed == int(counted) + ungated


def _single_vs_batched(model, x):
    with torch.no_grad():
        batched, macs = model(x), per_input_macs(model, x)[0]
        single = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        single_macs = torch.cat([per_input_macs(model, x[i : i + 1], batch_size=1)[0] for i in range(len(x))])
    return single, batched, single_macs, macs


@pytest.mark.parametrize("empty", ["conv1", "conv2"])
def test_compact_block_when_a_gate_keeps_nothing(tiny_resnet, empty):
    """conv1 keeping nothing leaves conv2 its BatchNorm shift; conv2 keeping nothing leaves the shortcut."""
    model = gated(tiny_resnet).double()
    set_random_gates(model)
    for block in (model.layer1[0], model.layer2[0]):  # an identity and a projection shortcut
        getattr(block, empty).gate.threshold.fill_(1e9)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    single, batched, single_macs, macs = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)
    assert len(model.layer2[0].conv1.last_kept if empty == "conv1" else model.layer2[0].conv2.last_kept) == 0


def test_compact_block_follows_weight_and_threshold_changes(tiny_resnet):
    """The folded batch-1 weights are rebuilt when a conv, BatchNorm or threshold changes in place."""
    model = gated(tiny_resnet).double()
    set_random_gates(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _single_vs_batched(model, x)  # builds the caches
    with torch.no_grad():
        model.layer1[0].bn1.running_var.mul_(3.0)
        model.layer2[0].conv2.weight.mul_(-1.0)
        model.layer3[0].conv1.gate.threshold.fill_(1.5)
        model.layer3[0].conv2.gate.w1.mul_(2.0)  # the gate's sum-pooling weights are cached too
    single, batched, _, _ = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())


@pytest.mark.parametrize("budget", [4, 0])
def test_cached_kept_set_slices_give_the_same_outputs(tiny_resnet, budget, monkeypatch):
    """Repeated inputs reuse the sliced weights of their kept sets (no new slices); a cache over its budget starts
    over (budget 0: after every new slice) and still gives the batched masking's outputs."""
    monkeypatch.setattr("criteria.manidp.SLICE_CACHE_WEIGHTS", budget)
    model = gated(tiny_resnet).double()
    set_random_gates(model)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    first, batched, _, _ = _single_vs_batched(model, x)
    misses = sum(c.slice_misses for c in gated_layers(model))
    second, _, _, _ = _single_vs_batched(model, x)
    assert torch.equal(first, second)
    assert torch.allclose(second, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    again = sum(c.slice_misses for c in gated_layers(model)) - misses
    with torch.no_grad():
        model(x)  # batched: every input's mask
    distinct = sum(len({bytes(m) for m in (c.last_mask > 0).numpy()}) for c in gated_layers(model))
    assert misses >= distinct > len(gated_layers(model))  # the gates chose several sets per conv
    assert again == 0 if budget else again > 0


def test_manifold_loss_zero_for_identical_similarities():
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(6, 10, generator=g)
    assert float(manifold_loss([pi * 3.0], [pi])) == pytest.approx(0.0, abs=1e-6)  # same cosine Gram matrix
    feats = torch.rand(6, 12, generator=g)
    assert float(manifold_loss([feats], [pi])) > 1e-4
    # by hand: orthogonal features (T = I) against identical saliencies (R = all ones), B = 2: 2 / 4
    t = torch.eye(2)
    r = torch.ones(2, 3)
    assert float(manifold_loss([t, t], [r, r])) == pytest.approx(2 * 0.5)


def test_instance_weights_and_sparsity_loss():
    ce = torch.tensor([0.0, 0.5, 1.0, 3.0])
    beta = instance_weights(ce, complexity=1.0, gamma=1.0)
    assert torch.allclose(beta, torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert torch.allclose(instance_weights(ce, 1.0, gamma=2.0), torch.tensor([1.0, 0.25, 0.0, 0.0]))
    pis = [torch.ones(4, 3), torch.full((4, 5), 2.0)]
    assert float(sparsity_loss(pis, beta)) == pytest.approx((1.5 * 1 + 1.5 * 2) / 4)


def test_thresholds_follow_the_cosine_schedule(tiny_resnet):
    model = gated(tiny_resnet)
    layers = gated_layers(model)
    hooks = ManiDPHooks(remain=0.6, lam=5e-3, eta=1.0, gamma=1.0, thre_cls=0.5, complexity=1.0)
    epochs = 5
    assert remain_rate(-1, epochs, 0.6) == pytest.approx(1.0) and remain_rate(epochs - 1, epochs, 0.6) == pytest.approx(
        0.6
    )
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        sums = [torch.rand(c.out_channels, generator=g) * 8 for c in layers]
        hooks.saliency_sums, hooks.seen, hooks.ce_sum = [s.clone() for s in sums], 8, 8 * (1.0 + epoch)
        hooks.on_epoch_end(model, epoch, epochs, {})
        assert hooks.complexity == pytest.approx(0.5 * (1.0 + epoch))  # thre_cls * mean CE of the epoch
        for conv, s in zip(layers, sums, strict=True):
            if epoch == 0:  # no threshold after the first epoch
                assert float(conv.gate.threshold) == THRESHOLD_INIT
                continue
            r = (1 + 0.6) / 2 + (1 - 0.6) / 2 * math.cos(math.pi * (epoch + 1) / epochs)
            k = math.ceil(r * conv.out_channels - 1e-9)
            assert float(conv.gate.threshold) == pytest.approx(float(torch.sort(s / 8, descending=True).values[k - 1]))
            assert int((s / 8 >= conv.gate.threshold).sum()) == k
    assert [h.get("rate") for h in hooks.history][1:] == pytest.approx(
        [remain_rate(e, epochs, 0.6) for e in range(1, epochs)]
    )


def test_no_weight_decay_on_gates(tiny_resnet):
    model = gated(tiny_resnet)
    hooks = ManiDPHooks(0.6, 5e-3, 1.0, 1.0, 0.5, 1.0)
    names = [n for n, _ in model.named_parameters()]
    free = [n for n in names if hooks.no_weight_decay(n)]
    assert len(free) == 18 * 3 and all(".gate." in n for n in free)
    assert not hooks.no_weight_decay("layer1.0.conv1.weight") and not hooks.no_weight_decay("fc.weight")


def test_short_training_with_the_hooks(digits_calib):
    """A minimal loop calling the hooks as the engine does: the losses are finite, the gates learn, thresholds
    are set after the second epoch and the trained model prunes at batch 1."""
    x, y = digits_calib
    torch.manual_seed(0)
    base = models.create_model("resnet20", num_classes=10, in_channels=1).eval()
    ctx = Context(base, (), (), x[:1], 10, Target("macs", 0.5), calib=CalibData(x[:64], y[:64]), seed=0)
    cls = get_criterion("manidp")
    result = check_result(cls(cls.Options(lambda_sparsity=0.05)).run(ctx), ())
    assert isinstance(result, Dynamic) and isinstance(result.hooks, ManiDPHooks)
    model, hooks = result.model, result.hooks
    assert 0.3 < result.extra["remain"] < 1 and hooks.complexity > 0
    decay = [p for n, p in model.named_parameters() if not hooks.no_weight_decay(n)]
    free = [p for n, p in model.named_parameters() if hooks.no_weight_decay(n)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": free, "weight_decay": 0.0}], lr=0.02,
                          momentum=0.9, nesterov=True)  # fmt: skip
    epochs, before = 3, copy.deepcopy([p.detach().clone() for p in free])
    hooks.on_train_start(model, 4, epochs)  # schedule=ramp (default) counts the steps
    for epoch in range(epochs):
        model.train()
        for i in range(0, 64, 16):
            xb, yb = x[i : i + 16], y[i : i + 16]
            logits = model(xb)
            ce = F.cross_entropy(logits, yb, reduction="none")
            extra = hooks.extra_loss(model, xb, yb, logits, ce.detach())
            assert extra is not None and torch.isfinite(extra) and extra.requires_grad
            loss = ce.mean() + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
        hooks.on_epoch_end(model, epoch, epochs, {"train_loss": float(loss.detach())})
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, free, strict=True))
    thresholds = [float(c.gate.threshold) for c in gated_layers(model)]
    assert all(t > THRESHOLD_INIT for t in thresholds)
    model.eval()
    total, _ = per_input_macs(model, x[:8])
    assert torch.all(total < count_macs(base, x[:1]))  # the schedule ended at t < 1: channels are skipped
    # the eval-mode fit (at the ramp's end and after the last epoch) meets the target on the calibration images
    keep = float(per_input_macs(model, x[:64])[0].mean()) / count_macs(base, x[:1])
    assert 0.42 <= keep <= 0.5, keep


def test_fit_thresholds_pass_the_rate_of_decisions_in_eval_mode():
    torch.manual_seed(0)
    model = gated(models.create_model("resnet20", num_classes=10, in_channels=3).eval())
    set_random_gates(model)  # continuous saliencies; random gates compound, so deep layers saturate (ties)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for rate in (0.3, 0.7):
        fit_thresholds(model, x, rate)
        model(x)  # eval mode, the thresholds just set
        checked = 0
        for conv in gated_layers(model):
            if int((conv.last_saliency == conv.gate.threshold).sum()) <= 1:  # tied saliencies all pass
                assert float(conv.last_keep().float().mean()) == pytest.approx(rate, abs=0.02)
                checked += 1
        assert checked >= 5 and not model.training


def test_fit_to_macs_meets_the_budget(tiny_resnet, example_input):
    model = gated(tiny_resnet)
    set_random_gates(model)
    x = torch.randn(32, *example_input.shape[1:], generator=torch.Generator().manual_seed(2))
    dense = float(per_input_macs(model, x)[0].mean())  # every channel kept (thresholds at their initial value)
    rate, macs = fit_to_macs(model, x, 0.6 * dense)
    assert macs <= 0.6 * dense and macs >= 0.55 * dense and 0 < rate < 1
    assert float(per_input_macs(model, x)[0].mean()) == pytest.approx(macs)  # the thresholds it returned are set


def test_params_target_and_bad_options_are_refused(tiny_resnet, example_input):
    cls = get_criterion("manidp")
    calib = CalibData(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    ctx = Context(tiny_resnet, (), (), example_input, 10, Target("params", 0.3), calib=calib)
    with pytest.raises(BadValue, match="MACs"):
        cls().run(ctx)
    with pytest.raises(BadValue):
        cls(cls.Options(remain=1.5)).run(ctx)
    with pytest.raises(BadValue, match="track-momentum"):
        cls(cls.Options(schedule="track", track_momentum=1.0)).run(ctx)
    with pytest.raises(BadValue, match="l1-spread"):
        cls(cls.Options(l1_spread=2.0, remain=0.7)).run(ctx)
    assert cls(cls.Options(remain=0.7)).run(ctx).extra["remain"] == 0.7


def test_safetensors_round_trip_rebuilds_identical_model(tmp_path):
    base = models.create_model("resnet20").eval()
    model = wrap(copy.deepcopy(base), {"criterion": "manidp"}, torch.Generator().manual_seed(0)).eval()
    set_random_gates(model, threshold=0.9)
    config = {"criterion": "manidp", "squeeze_rate": 2, "clamp_max": 1000.0, "gate_init": "kaiming"}
    x = torch.randn(3, 3, 16, 16)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = get_criterion("manidp").rebuild(models.create_model("resnet20"), config)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and torch.equal(fresh(x[:1]), model(x[:1]))
    model.prune_cli_arch, model.prune_cli_dynamic = base.prune_cli_arch, config
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert [float(c.gate.threshold) for c in gated_layers(loaded)] == pytest.approx([0.9] * 18)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(per_input_macs(loaded, x)[0], per_input_macs(model, x)[0])


def test_ahead_schedule_reaches_the_target_before_the_last_epoch(tiny_resnet):
    """schedule=ahead: after epoch e the thresholds of r(e+1), so the last epoch already trains at rate t; the
    thresholds it trained with are kept after it."""
    model = gated(tiny_resnet)
    hooks = ManiDPHooks(remain=0.5, lam=5e-3, eta=1.0, gamma=1.0, thre_cls=0.5, complexity=1.0, ahead=True)
    epochs = 3
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        sums = [torch.rand(c.out_channels, generator=g) * 8 for c in gated_layers(model)]
        hooks.saliency_sums, hooks.seen, hooks.ce_sum = sums, 8, 8.0
        trained_with = [c.gate.threshold.clone() for c in gated_layers(model)]
        hooks.on_epoch_end(model, epoch, epochs, {})
    rates = [h.get("rate") for h in hooks.history]
    assert rates[0] is None and rates[1:] == pytest.approx([0.5, 0.5])  # official: [r(1) = 0.625, 0.5]
    assert all(torch.equal(c.gate.threshold, t) for c, t in zip(gated_layers(model), trained_with, strict=True))
    assert not all(torch.equal(t, torch.full_like(t, THRESHOLD_INIT)) for t in trained_with)


def test_track_schedule_moves_thresholds_with_the_saliencies_each_step(tiny_resnet):
    """schedule=track: within an epoch, after every step each threshold is the k-th largest of the moving average
    of the batch-mean saliencies, at the epoch's rate; before any rate is set, nothing moves."""
    model = gated(tiny_resnet)
    layers = gated_layers(model)
    hooks = ManiDPHooks(0.5, 5e-3, 1.0, 1.0, 0.5, 1.0, ahead=True, track_momentum=0.5)
    x = torch.randn(4, 3, 16, 16)
    set_random_gates(model, threshold=THRESHOLD_INIT)
    model.train()

    def step():
        logits = model(x)
        hooks.extra_loss(model, x, None, logits, torch.ones(4))
        return [c.last_saliency.detach().mean(0) for c in layers]

    step()
    assert all(float(c.gate.threshold) == THRESHOLD_INIT for c in layers)  # epoch 0: no rate yet
    hooks.on_epoch_end(model, 0, 3, {})
    hooks.saliency_sums, hooks.seen = [torch.linspace(0, 8, c.out_channels) for c in layers], 8
    hooks.on_epoch_end(model, 1, 3, {})  # rate r(2) = t = 0.5, moving average starts at the epoch means
    start = [torch.linspace(0, 1, c.out_channels) for c in layers]
    assert hooks.rate == pytest.approx(0.5)
    means = step()
    for conv, s, b in zip(layers, start, means, strict=True):
        ema = 0.5 * s + 0.5 * b
        assert float(conv.gate.threshold) == pytest.approx(
            float(ema.sort(descending=True).values[conv.out_channels // 2 - 1])
        )


def test_compact_vgg_features_match_the_batched_masking(tiny_vgg):
    """VGG at batch 1 carries the kept channels from gated conv to gated conv; a conv that keeps nothing leaves the
    next one only its BatchNorm shift; in-place edits rebuild the folded weights."""
    model = gated(tiny_vgg).double()
    set_random_gates(model)
    layers = gated_layers(model)
    layers[1].gate.threshold.fill_(1e9)  # keeps nothing: layers[2] sees zeros
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    single, batched, single_macs, macs = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())
    assert torch.equal(single_macs, macs)
    assert len(layers[1].last_kept) == 0 and 0 < len(layers[0].last_kept) < layers[0].out_channels
    with torch.no_grad():
        layers[1].gate.threshold.fill_(1.0)
        model.features[-2].running_var.mul_(3.0)  # the last BatchNorm
    single, batched, _, _ = _single_vs_batched(model, x)
    assert torch.allclose(single, batched, rtol=1e-9, atol=1e-12 * batched.abs().max())


def test_l1_gate_start_keeps_the_function_and_ranks_channels_by_l1(tiny_resnet):
    """gate_init=l1: the gated model computes the base's function, and each gate's saliencies (equal for every
    input) order the channels as their filters' L1 norms, so quantile thresholds first drop what l1 would."""
    from criteria.manidp import l1_start

    model = gated(tiny_resnet, INTERNAL)
    l1_start(model, spread=0.2)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_resnet(x), rtol=1e-5, atol=1e-5)
        for conv in gated_layers(model):
            pi = conv.last_saliency
            assert torch.equal(pi[0], pi[1])
            assert torch.equal(pi[0].argsort(), conv.weight.abs().sum((1, 2, 3)).argsort())
            assert float(pi.max() - pi.min()) == pytest.approx(0.2)
