"""The training loop: it learns, it is seeded, hooks run, checkpoints resume, evaluation counts right."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import models
from prune_cli import engine
from prune_cli.api import TrainHooks
from prune_cli.data import splits as D
from prune_cli.errors import BadValue


@pytest.fixture(scope="module")
def splits():
    s = D.make_splits(D.load_dataset("digits"), seed=0)
    # A quarter of digits keeps every test here around a second.
    return dataclasses.replace(s, train=D.Split(s.train.x[:384], s.train.y[:384]))


def small_model(splits):
    return models.create_model("vgg11", num_classes=splits.num_classes, in_channels=1)


CFG = engine.TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=0)


def test_training_learns_digits(splits):
    model = small_model(splits)
    before = engine.evaluate(model, splits.val, splits).top1
    result = engine.train(model, splits, dataclasses.replace(CFG, epochs=3))
    after = engine.evaluate(model, splits.val, splits).top1
    assert after > max(0.5, before + 0.2)
    assert len(result.history) == 3 and result.history[-1]["val_acc"] == pytest.approx(after)


def test_training_is_deterministic_for_a_seed(splits):
    a, b = small_model(splits), small_model(splits)
    b.load_state_dict(a.state_dict())
    ha = engine.train(a, splits, CFG).history
    hb = engine.train(b, splits, CFG).history
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]


def test_hooks_add_loss_and_see_epochs(splits):
    class Hooks(TrainHooks):
        def __init__(self):
            self.epochs, self.calls = [], 0

        def extra_loss(self, model, x, y, logits, per_sample_ce):
            self.calls += 1
            assert per_sample_ce.shape == y.shape
            return sum(p.pow(2).sum() for p in model.classifier[-1].parameters())

        def on_epoch_end(self, model, epoch, epochs, stats):
            self.epochs.append((epoch, epochs))

        def no_weight_decay(self, name):
            return name.startswith("classifier")

    hooks = Hooks()
    model, plain = small_model(splits), small_model(splits)
    plain.load_state_dict(model.state_dict())
    engine.train(model, splits, CFG, hooks=hooks)
    engine.train(plain, splits, CFG)
    assert hooks.epochs == [(0, 2), (1, 2)]
    assert hooks.calls == 2 * (len(splits.train) // CFG.batch_size)
    # the extra L2 term shrinks the last layer's weights compared with the same run without it
    assert model.classifier[-1].weight.norm() < 0.5 * plain.classifier[-1].weight.norm()
    groups = engine.make_optimizer(model, CFG, hooks).param_groups
    assert [g["weight_decay"] for g in groups] == [CFG.weight_decay, 0.0]


def test_interrupted_run_resumes_to_the_same_weights(splits, tmp_path):
    """Killed during epoch 2, resumed from the epoch-1 checkpoint: same weights as an uninterrupted run."""
    steps = len(splits.train) // CFG.batch_size

    class KillInEpochTwo(TrainHooks):
        calls = 0

        def extra_loss(self, model, x, y, logits, per_sample_ce):
            self.calls += 1
            if self.calls > steps + 1:
                raise KeyboardInterrupt
            return None

    a, b = small_model(splits), small_model(splits)
    b.load_state_dict(a.state_dict())
    engine.train(a, splits, CFG)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        engine.train(b, splits, CFG, checkpoint=ckpt, hooks=KillInEpochTwo())
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    c = small_model(splits)  # a fresh process starts from other weights: resume must overwrite them
    history = engine.train(c, splits, CFG, checkpoint=ckpt, resume=True).history
    assert [h["epoch"] for h in history] == [1, 2]
    x = D.to_float(splits.val.x[:16], splits)
    assert torch.allclose(a.eval()(x), c.eval()(x), atol=1e-5)


def test_evaluate_counts_top1_and_top5():
    class FirstTwenty(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :20]

    x = torch.zeros(4, 1, 5, 4, dtype=torch.uint8)
    x[0, 0, 0, 3] = 255  # image 0 -> class 3 (label 3: right)
    x[1, 0, 1, 1] = 255  # image 1 -> class 5 (label 6: wrong top-1; 6 ties with the rest in top-5)
    x[2, 0, 0, 0] = 255  # image 2 -> class 0 (label 1: wrong)
    x[3, 0, 0, 2] = 255  # image 3 -> class 2 (label 2: right)
    split = D.Split(x, torch.tensor([3, 6, 1, 2]))
    splits = D.Splits(
        train=split, val=split, calib=split, test=split, mean=(0.0,), std=(1.0,), num_classes=20, flip=False, pad=0,
        dataset="t",
    )  # fmt: skip
    result = engine.evaluate(FirstTwenty(), split, splits)
    assert result.top1 == pytest.approx(2 / 4)
    assert result.top5 is not None and result.top5 >= result.top1


def test_bad_recipe_values():
    with pytest.raises(BadValue):
        engine.TrainConfig(lr=0)
    with pytest.raises(BadValue):
        engine.TrainConfig(epochs=-1)


# ----------------------------------------------------------------------------- BatchNorm re-estimation (one for all)
def _net() -> nn.Sequential:
    """conv -> BN -> ReLU -> dropout -> conv -> BN: the dropout sits before a BatchNorm, so its mode shows."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )


def _plain_average(net: nn.Sequential, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What re-estimation must give the last BatchNorm: the mean over batches of each batch's mean and unbiased
    variance of its input, with the first BatchNorm normalising by the batch (training mode) and dropout off."""
    front = copy.deepcopy(net[:5]).eval()
    front[1].train()
    means, variances = [], []
    with torch.no_grad():
        for x in batches:
            h = front(x)
            means.append(h.mean((0, 2, 3)))
            variances.append(h.var((0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_recalibration_is_a_plain_average_over_batches_with_dropout_off_and_modes_restored():
    net = _net().eval()
    x = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    # 11 images at batch 5: the last image alone would be a batch of one, so it joins the batch before (5, 6).
    mean, var = _plain_average(net, [x[:5], x[5:]])
    assert engine.recalibrate_batchnorm(net, x, images=11, batch_size=5) == 2
    assert torch.allclose(net[5].running_mean, mean, atol=1e-5) and torch.allclose(net[5].running_var, var, atol=1e-5)
    assert not any(m.training for m in net.modules()) and net[5].momentum == 0.1  # modes and momentum as they were
    net.train()
    engine.recalibrate_batchnorm(net, x, images=11, batch_size=5)
    assert all(m.training for m in net.modules())


def test_recalibration_takes_splits_or_images_and_a_frozen_front():
    s = D.make_splits(D.load_dataset("digits"), seed=0)
    a, b = small_model(s), small_model(s)
    b.load_state_dict(a.state_dict())
    assert engine.recalibrate_batchnorm(a, s, images=100, batch_size=32) > 0
    engine.recalibrate_batchnorm(b, D.to_float(s.train.x[:300], s), images=100, batch_size=32)
    assert all(torch.allclose(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # A frozen front (SINF's extractor): its BatchNorm is left alone, the rest sees its output.
    front, tail = _net()[:2].eval(), _net()[2:].eval()
    before = front[1].running_mean.clone()
    x = torch.randn(8, 1, 8, 8)
    assert engine.recalibrate_batchnorm(tail, x, images=8, features=front) == 1
    assert torch.equal(front[1].running_mean, before) and tail[3].num_batches_tracked == 1
    assert engine.recalibrate_batchnorm(tail, x[:1], features=front) == 0  # one image: nothing to estimate
