"""ManiDP: bounded saliencies, input-dependent gates after a short training, and `static_below` (channels that no
calibration input keeps removed physically; the gated rest unchanged; the smaller model file reloads)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import models
from criteria.manidp import gated_layers, wrap
from criteria.manidp.static import strip, to_static
from criteria.manidp.train import ManiDPHooks
from prune_cli import engine
from prune_cli.api import CalibData, Context, Target, check_result, get_criterion
from prune_cli.api.dynamic import input_dependence, is_dynamic, keep_stats, per_input_macs
from prune_cli.metrics import count_macs, count_params
from prune_cli.store.modelfile import load_model, save_model

CONFIG = {"criterion": "manidp", "squeeze_rate": 2, "clamp_max": 2.0, "gate_init": "identity"}


def train_steps(model, hooks, x, y, steps, lr, epochs=3, batch=32):
    """The engine's optimiser (weight decay and lr scales from the hooks) over `steps` batches per epoch."""
    cfg = engine.TrainConfig(epochs=epochs, batch_size=batch, lr=lr, weight_decay=5e-4, warmup_epochs=0.0)
    opt = engine.make_optimizer(model, cfg, hooks)
    hooks.on_train_start(model, steps, epochs)
    for epoch in range(epochs):
        model.train()
        for i in range(steps):
            xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
            logits = model(xb)
            ce = F.cross_entropy(logits, yb, reduction="none")
            loss = ce.mean() + hooks.extra_loss(model, xb, yb, logits, ce.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        hooks.on_epoch_end(model, epoch, epochs, {})
    return model.eval()


def manidp_on_digits(digits_calib, **options):
    x, y = digits_calib
    x = F.avg_pool2d(x, 2)  # 16x16: a quarter of the time    torch.manual_seed(0)
    base = models.create_model("resnet20", num_classes=10, in_channels=1).eval()
    ctx = Context(base, (), (), x[:1], 10, Target("macs", 0.5), calib=CalibData(x[:128], y[:128]), seed=0)
    cls = get_criterion("manidp")
    return check_result(cls(cls.Options(**options)).run(ctx), ()), x, y


def test_saliencies_stay_within_their_bound_under_a_huge_learning_rate(digits_calib):
    result, x, y = manidp_on_digits(digits_calib, gate_lr=1e4)
    model, hooks = result.model, result.hooks
    bound = get_criterion("manidp").Options().clamp_max
    train_steps(model, hooks, x, y, steps=3, lr=0.05, epochs=1)
    assert any(h["saliency_max"] == bound for h in hooks.history)  # the gates were pushed to the bound
    with torch.no_grad():
        model.train()
        model(x[:64])
    for conv in gated_layers(model):
        pi = conv.last_saliency
        assert torch.all(pi >= 0) and torch.all(pi <= bound), float(pi.max())  # NaN fails too


def test_default_gates_keep_different_channels_for_different_inputs(digits_calib):
    """A few steps with the default options: the thresholds are set, and inputs keep different sets of channels."""
    result, x, y = manidp_on_digits(digits_calib)
    model = train_steps(result.model, result.hooks, x, y, steps=3, lr=0.05)
    stats = input_dependence(model, x[128:256])
    assert len(stats) == 9  # the blocks' conv1: no residual group is in this context's scope
    varying = [s["varying"] for s in stats.values()]
    jaccard = [s["jaccard"] for s in stats.values()]
    kept = [s["kept"] for s in stats.values()]
    assert max(kept) < 1.0  # thresholds apply
    # a gate that ignores its input gives every input the same set: no channel varies, the distance is 0
    assert sum(v > 0 for v in varying) >= 6 and sum(jaccard) / len(jaccard) > 0.005, (varying, jaccard)


def test_keep_stats_by_hand():
    keep = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s = keep_stats(keep)
    # channel 0 always, 3 never, 1 and 2 vary; pairs: (0,1) 1 - 1/3, (0,2) 0, (1,2) 1 - 1/3
    assert s["varying"] == 0.5 and s["always"] == 0.25 and s["never"] == 0.25
    assert s["jaccard"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert s["kept"] == pytest.approx(6 / 12)
    assert keep_stats(torch.zeros(2, 3, dtype=torch.bool))["jaccard"] == 0.0  # two empty sets: distance 0


def random_gates(model, seed=0, threshold=1.0, never=()):
    """Input-dependent saliencies around 1; the convs named in `never` lose their even channels for every input."""
    g = torch.Generator().manual_seed(seed)
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad():
        for conv in gated_layers(model):
            conv.gate.w1.copy_(torch.randn(conv.gate.w1.shape, generator=g) * 0.3)
            conv.gate.w2.copy_(torch.randn(conv.gate.w2.shape, generator=g) * 0.3)
            conv.gate.threshold.fill_(threshold)
            if names[conv] in never:
                conv.gate.b2[::2] = -100.0  # pi = relu(w2 h - 100) = 0


@pytest.mark.parametrize(
    ("fixture", "never"),
    [
        ("tiny_resnet", ("layer1.0.conv1", "layer2.1.conv1", "layer3.0.conv2")),
        ("tiny_vgg", ("features.4", "features.8")),
    ],
)
def test_static_below_removes_never_kept_channels_and_keeps_the_outputs(fixture, never, request, tmp_path):
    base = request.getfixturevalue(fixture)
    model = wrap(copy.deepcopy(base), CONFIG).double().eval()
    model.prune_cli_dynamic = dict(CONFIG)
    random_gates(model, never=never)
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        want_single = torch.cat([model(x[i : i + 1]) for i in range(4)])
    macs_before = per_input_macs(model, x)[0]
    small, plain, report = to_static(model, x, 0.01, x[:1], CONFIG)
    widths = {n: m.out_channels for n, m in small.named_modules() if n in never}
    full = {n: m.out_channels for n, m in model.named_modules() if n in never}
    gated_input = [n for n in never if n.endswith("conv1") or n.startswith("features")]
    assert all(widths[n] <= full[n] // 2 for n in gated_input)  # the never-kept half is gone
    if fixture == "tiny_resnet":  # a block's conv2 feeds the residual sum: it stays gated at full width
        assert widths["layer3.0.conv2"] == full["layer3.0.conv2"]
    assert report["removed_channels"] >= sum(full[n] - widths[n] for n in gated_input) > 0
    assert is_dynamic(small) and not is_dynamic(plain)
    assert report["macs"] < count_macs(base, x[:1].float()) and report["params"] < count_params(base)
    assert small.prune_cli_dynamic["hidden"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
        single = torch.cat([small(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(single, want_single, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    assert torch.all(per_input_macs(small, x)[0] < macs_before)
    # the smaller gated model reloads from its file through the criterion's rebuild
    small.float()
    loaded = load_model(save_model(small, tmp_path / "m.safetensors"))
    xf = x.float()
    with torch.no_grad():
        assert torch.equal(loaded(xf), small(xf)) and torch.equal(loaded(xf[:1]), small(xf[:1]))
    assert torch.equal(per_input_macs(loaded, xf)[0], per_input_macs(small, xf)[0])


def test_static_below_keeps_the_model_when_every_channel_is_used(tiny_resnet):
    model = wrap(copy.deepcopy(tiny_resnet), CONFIG).eval()
    x = torch.randn(8, 3, 16, 16)
    small, plain, report = to_static(model, x, 0.01, x[:1], CONFIG)
    assert small is model and report["removed_channels"] == 0
    with torch.no_grad():  # the plain copy is the base model: the identity gates scale by 1
        torch.testing.assert_close(strip(model)(x), tiny_resnet(x))


def test_hooks_scale_the_gates_learning_rate(tiny_resnet):
    model = wrap(copy.deepcopy(tiny_resnet), CONFIG)
    hooks = ManiDPHooks(0.6, 5e-3, 1.0, 1.0, 0.5, 1.0, gate_lr=7.0)
    opt = engine.make_optimizer(model, engine.TrainConfig(lr=0.1), hooks)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model.layer1[0].conv1.gate.w1)] == pytest.approx(0.7)
    assert lrs[id(model.layer1[0].conv1.weight)] == pytest.approx(0.1)
