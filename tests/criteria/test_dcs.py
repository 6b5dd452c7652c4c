"""DCS: a channel that separates the classes outranks one that carries noise; results conform; runs repeat."""

import pytest
import torch
from torch import nn

import models
from criteria.dcs import DCS, DCSOptions, channel_scores, dcs_scores, pooled_activations
from prune_cli import api
from prune_cli.errors import BadConfig, BadValue, PruneCliError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small layers: one thread avoids OpenMP spinning on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def constructed(n_per_class: int = 60, classes: int = 3, seed: int = 0):
    """Images (N, 3, 6, 6): channel 0 carries the class (its mean), channels 1 and 2 only noise.

    Channel 2 is noise with a large scale, so a score that followed magnitude instead of class
    separation would rank it first.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), 3, 6, 6, generator=g) * 0.5
    x[:, 0] += 3.0 * y[:, None, None].float()
    x[:, 2] *= 10.0
    x += 40.0  # stays positive through the ReLU
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


class Tiny(nn.Module):
    """conv1 (identity 1x1, 3 -> 3) -> bn1 -> relu -> conv2 (3 -> 4) -> GAP -> fc: the group is conv1's output."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.eye(3)[:, :, None, None])

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.conv2(h).mean((2, 3)))


GROUP = api.ChannelGroup(
    id="conv1",
    size=3,
    members=(
        api.Member("conv1", "conv_out"),
        api.Member("bn1", "bn"),
        api.Member("conv2", "conv_in"),
    ),
)


def context(model, x, y):
    return api.Context(
        model=model.eval(),
        groups=(GROUP,),
        all_groups=(GROUP,),
        example_input=x[:1],
        num_classes=3,
        target=api.Target(),
        calib=api.CalibData(x, y),
    )


@pytest.mark.parametrize("activation", ["input", "norm", "producer"])
@pytest.mark.parametrize("probe,solver", [("lda", "lsqr"), ("lda", "eigen"), ("logistic", "lsqr")])
def test_separating_channel_outranks_noise(activation, probe, solver):
    x, y = constructed()
    torch.manual_seed(0)
    options = DCSOptions(activation=activation, probe=probe, lda_solver=solver)
    scores = dcs_scores(Tiny().eval(), [GROUP], x, y, options=options)["conv1"]
    assert scores.shape == (3,)
    assert scores[0] == pytest.approx(1.0)  # normalised by the group's max
    assert scores[0] > 3 * scores[1] and scores[0] > 3 * scores[2]


def test_criterion_result_conforms_and_is_deterministic():
    x, y = constructed()
    torch.manual_seed(0)
    model = Tiny()
    first = DCS().run(context(model, x, y))
    second = DCS().run(context(model, x, y))
    api.check_result(first, [GROUP])
    assert isinstance(first, api.Scores)
    assert torch.equal(first.per_group["conv1"], second.per_group["conv1"])
    assert torch.isfinite(first.per_group["conv1"]).all()
    assert DCS.needs == {"data", "labels"}
    assert api.get_criterion("dcs") is DCS


def test_scores_for_a_subset_of_classes_follow_that_subset():
    """Channel 0 separates classes 0/1/2; channel 1 separates only 3 from 4: each wins on its own subset."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(5).repeat_interleave(50)
    feats = torch.randn(len(y), 2, 4, generator=g) * 0.3
    feats[:, 0] += torch.where(y < 3, y, torch.zeros_like(y)).float()[:, None] * 2
    feats[:, 1] += (y == 4).float()[:, None] * 2
    low = channel_scores(feats, y, classes=[0, 1, 2])
    high = channel_scores(feats, y, classes=[3, 4])
    assert low[0] > 3 * low[1]
    assert high[1] > 3 * high[0]
    # A single class is scored one-vs-rest: class 4 is set apart by channel 1.
    single = channel_scores(feats, y, classes=[4])
    assert single[1] > single[0]


def test_dead_channel_scores_zero():
    x, y = constructed()
    feats = pooled_activations(Tiny().eval(), [GROUP], x)["conv1"]
    feats[:, 1] = 0.0
    assert channel_scores(feats, y)[1] == 0.0


def test_pooling_shapes():
    x, y = constructed()
    for q, r in [(1, 1), (2, 4), (3, 9)]:
        feats = pooled_activations(Tiny().eval(), [GROUP], x, q=q)["conv1"]
        assert feats.shape == (len(x), 3, r)


def test_bad_options_and_too_few_classes():
    with pytest.raises(BadValue):
        DCSOptions(q=0)
    with pytest.raises(BadValue):
        DCSOptions(shrinkage="lots")
    from prune_cli.config import build_dataclass

    assert build_dataclass(DCS.Options, {"q": "3", "probe": "logistic"}) == DCSOptions(q=3, probe="logistic")
    with pytest.raises(BadConfig):
        build_dataclass(DCS.Options, {"probe": "svm"})
    x, y = constructed()
    with pytest.raises(PruneCliError, match="two classes"):
        dcs_scores(Tiny().eval(), [GROUP], x, torch.zeros_like(y))


@pytest.mark.parametrize("shrinkage", ["auto", "0.3"])
def test_cholesky_lda_equals_scikit_learn(shrinkage):
    import numpy as np
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from criteria.dcs import _lda

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((300, 40)), rng.integers(0, 4, 300)
    X[:, 0] += y
    X[:, 5] = 0.0
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto" if shrinkage == "auto" else 0.3).fit(X, y)
    np.testing.assert_allclose(_lda(X, y, shrinkage, "lsqr"), ref.coef_, atol=1e-10)
    # Fisher directions are whitened by the within-class covariance and span the class means' differences.
    W = _lda(X, y, shrinkage, "eigen")
    assert W.shape == (3, 40)
    assert abs(W[:, 0]).sum() > 5 * abs(W[:, 1:]).sum(0).mean()


def test_pooling_a_flattened_group_reads_its_own_features():
    """After a flatten, channel c owns features offset + c*expand ... (api.Member): pooled per channel."""
    from criteria.dcs import _pool

    n, channels, side = 2, 3, 4
    maps = torch.arange(n * (channels + 1) * side * side, dtype=torch.float32).reshape(n, channels + 1, side, side)
    flat = maps.flatten(1)  # the group is channels 1..3 of the flattened map: offset = 1 * 16 features
    member = api.Member("fc", "linear_in", offset=side * side, expand=side * side)
    pooled = _pool(flat, member, channels, q=2)
    expected = torch.nn.functional.adaptive_avg_pool2d(maps[:, 1:], 2).flatten(2)
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_zoo_models_through_the_real_groups(name):
    """Every prunable group of a zoo model gets finite scores in [0, 1]; the result passes the conformance check."""
    from prune_cli.selection.plan import groups_in_scope
    from prune_cli.surgery import channel_groups

    torch.manual_seed(0)
    model = models.create_model(name, num_classes=4, in_channels=1).eval()
    x, y = torch.randn(64, 1, 16, 16), torch.arange(4).repeat(16)
    groups = tuple(groups_in_scope(channel_groups(model, x[:1]), "internal"))
    ctx = api.Context(model=model, groups=groups, all_groups=groups, example_input=x[:1], num_classes=4,
                      target=api.Target(), calib=api.CalibData(x, y))  # fmt: skip
    result = api.check_result(DCS(DCSOptions(q=1)).run(ctx), groups)
    assert set(result.per_group) == {g.id for g in groups}
    for s in result.per_group.values():
        assert float(s.max()) == pytest.approx(1.0) and float(s.min()) >= 0.0
