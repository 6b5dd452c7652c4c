"""Every registered criterion passes `prune_cli.testing.check_criterion` on every tiny test model, and the check
fails a criterion that breaks one of its properties."""

import dataclasses

import pytest
import torch
from helpers import TINY_MODELS, ZOO_MODELS

from prune_cli.api import CalibData, Criterion, Dynamic, Plan, Scores, Target, get_criterion, list_criteria
from prune_cli.errors import BadValue, PruneCliError
from prune_cli.testing import ConformanceError, check_criterion, make_context, plant_dead_channels, synthetic_calib

# Cheap settings for criteria that sweep, sample or search (their defaults are sized for real runs); a criterion not
# named here runs with its defaults, so a new one is checked without editing this file.
CHEAP = {
    "sensitivity": {"levels": [0.5], "trials": 1},
    "lasso": {"images": 32},
    "haste": {"search_images": 4},
}


def example(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# A class seen once in the made-up calibration images makes scikit-learn's covariance warn; the scores stay finite.
@pytest.mark.filterwarnings("ignore:Only one sample available")
@pytest.mark.parametrize("model_name", list(TINY_MODELS))
@pytest.mark.parametrize("criterion", list_criteria())
def test_every_criterion_conforms_on_every_tiny_model(criterion, model_name):
    factory, shape = TINY_MODELS[model_name]
    try:
        report = check_criterion(criterion, factory(), example(shape), options=CHEAP.get(criterion), target=0.3)
    except PruneCliError as exc:
        # A criterion may refuse a user's model it does not support, in one line (exit 2); never the zoo's.
        if model_name in ZOO_MODELS:
            raise
        pytest.skip(f"{criterion} refuses {model_name}: {exc}")
    assert {"check_result", "model untouched", "same seed repeats"} <= set(report.checks)
    if isinstance(report.result, Scores):
        assert report.planted and "dead channel ranks last" in report.checks


# ------------------------------------------------------------------------- the check fails a broken criterion
L1 = get_criterion("l1")


class Mutating(L1):
    def run(self, ctx):
        with torch.no_grad():
            ctx.model.get_submodule(ctx.groups[0].producers[0].module).weight.mul_(2)
        return super().run(ctx)


class Unseeded(L1):
    def run(self, ctx):  # torch's global generator, not ctx.generator(): two runs differ
        return Scores({g.id: torch.rand(g.size) for g in ctx.groups})


class Inverted(L1):
    def run(self, ctx):  # a dead channel's zero norm ranks first
        return Scores({gid: -s for gid, s in super().run(ctx).per_group.items()})


class Constant(L1):
    def run(self, ctx):  # ranks nothing: a dead channel ties with every live one
        return Scores({g.id: torch.ones(g.size) for g in ctx.groups})


class ShortScores(L1):
    def run(self, ctx):
        return Scores({gid: s[1:] for gid, s in super().run(ctx).per_group.items()})


class SharedDynamic(L1):
    def run(self, ctx):  # "dynamic" model that is the base itself: training it would train the base
        return Dynamic(model=ctx.model)


class BadOverride(L1):
    def run(self, ctx):
        g = ctx.groups[0]
        keep = torch.arange(g.size // 2)
        return Plan({g.id: keep}, {f"{g.producers[0].module}.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    "broken, message",
    [
        (Mutating, "changed the model it was given"),
        (Unseeded, "same seed gave a different result"),
        (Inverted, "does not rank last"),
        (Constant, "does not rank last"),
        (ShortScores, "fails check_result"),
        (SharedDynamic, "shares tensors with the base"),
        (BadOverride, "plan does not apply"),
    ],
)
def test_the_check_fails_a_criterion_that_breaks_a_property(broken, message):
    with pytest.raises(ConformanceError, match=message):
        check_criterion(broken)


def test_the_check_fails_a_dynamic_criterion_whose_model_does_not_rebuild():
    class Unrebuildable(get_criterion("haste")):
        @classmethod
        def rebuild(cls, model, config):  # forgets to wrap: a saved model file would not load
            return model

    with pytest.raises(ConformanceError, match="rebuilt from its config does not take its weights"):
        check_criterion(Unrebuildable, options={"search_images": 4})


def test_a_third_party_criterion_runs_the_same_check():
    """An unregistered criterion class (as a user's package would ship): |BatchNorm gamma| of each group."""

    class Slimming(Criterion):
        name = "slimming"
        paper = "1708.06519"

        @dataclasses.dataclass(frozen=True)
        class Options:
            eps: float = 0.0

        def run(self, ctx):
            modules = dict(ctx.model.named_modules())
            out = {}
            for g in ctx.groups:
                gammas = [modules[m.module].weight.detach().abs()[m.offset : m.offset + g.size] for m in g.norms]
                out[g.id] = torch.stack(gammas).mean(0) + self.options.eps if gammas else torch.zeros(g.size)
            return Scores(out)

    factory, shape = TINY_MODELS["resnet20"]
    report = check_criterion(Slimming, factory(), example(shape), options={"eps": "0.5"})
    assert "dead channel ranks last" in report.checks
    assert report.criterion == "slimming"


# -------------------------------------------------------------------------------------------- make_context
def test_make_context_is_the_context_of_a_real_run():
    factory, shape = TINY_MODELS["resnet20"]
    model, x = factory(), example(shape)
    ctx = make_context(model, x, target=0.3, calib=16, seed=5)
    assert ctx.target == Target("macs", 0.3) and ctx.seed == 5 and ctx.num_classes == 10
    assert ctx.groups and all(g.prunable and not g.residual for g in ctx.groups)
    assert len(ctx.all_groups) > len(ctx.groups)
    assert ctx.calib.x.shape == (16, 3, 16, 16) and ctx.calib.y.unique().numel() >= 2
    assert {g.id for g in make_context(model, x, scope="all").groups} > {g.id for g in ctx.groups}
    only = ctx.groups[0].id
    assert [g.id for g in make_context(model, x, only={only}).groups] == [only]
    # images alone are labelled by the model; the example input defaults to the first image
    images = torch.randn(8, 3, 16, 16)
    labelled = make_context(model, calib=images)
    assert torch.equal(labelled.example_input, images[:1])
    assert torch.equal(labelled.calib.y, model(images).argmax(1))
    with pytest.raises(BadValue, match="example input"):
        make_context(model)


def test_synthetic_calibration_is_labelled_by_the_model_and_seeded():
    factory, shape = TINY_MODELS["vgg"]
    model, x = factory(), example(shape)
    a, b = synthetic_calib(model, x, 32, seed=1), synthetic_calib(model, x, 32, seed=1)
    assert isinstance(a, CalibData) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    with torch.no_grad():
        predicted = model(a.x).argmax(1)
    assert torch.equal(a.y, predicted) or predicted.unique().numel() < 2


def test_planted_dead_channels_output_zero():
    factory, shape = TINY_MODELS["concat_net"]
    model, x = factory(), example(shape)
    ctx = make_context(model, x)
    planted = plant_dead_channels(model, ctx.groups)
    assert planted
    outputs = {}
    hooks = [model.get_submodule(g.norms[0].module if g.norms else g.producers[0].module).register_forward_hook(
        lambda m, i, o, gid=g.id: outputs.__setitem__(gid, o)) for g in ctx.groups if g.id in planted]  # fmt: skip
    with torch.no_grad():
        model(torch.randn(4, *shape[1:]))
    for h in hooks:
        h.remove()
    for gid, c in planted.items():
        assert outputs[gid][:, c].abs().max() == 0
        assert outputs[gid].abs().sum() > 0
