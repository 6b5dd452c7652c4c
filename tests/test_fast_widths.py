"""Fast widths: widths slower than a wider one are never kept, the target is still met, and layers are timed once
per shape. A synthetic timer makes the rule testable; one test times real layers."""

import pytest
import torch
from helpers import three_conv_net as net

from prune_cli.api import Scores, Target
from prune_cli.selection import fast_widths as FW
from prune_cli.selection.plan import groups_in_scope, select
from prune_cli.surgery import CostModel, channel_groups

X = torch.randn(1, 3, 12, 12)


def banded_ms(in_width: int, out_width: int) -> float:
    """A kernel landscape like oneDNN's at batch 64: a width from 9 to 15 costs as much as 16 (in or out)."""

    def w(c: int) -> int:
        return 16 if 9 <= c <= 15 else c

    return float(w(in_width) * w(out_width))


class BandedTimer:
    def __init__(self, *args, **kwargs):
        pass

    def measure(self, shapes) -> None:
        pass

    def ms(self, name: str, in_width: int, out_width: int) -> float:
        return banded_ms(in_width, out_width)


@pytest.fixture
def setup():
    model = net()
    groups = groups_in_scope(channel_groups(model, X), "all")
    return model, groups, CostModel(model, X)


def test_slower_than_a_wider_width_is_never_fast(setup):
    model, groups, cost = setup
    lowest = {g.id: 1 for g in groups}
    fast = FW.fast_widths(cost, BandedTimer(), groups, {}, lowest)
    assert fast["0"] == [16, 8, 7, 6, 5, 4, 3, 2, 1]  # 9..15 cost what 16 costs
    assert fast["3"] == [16, 8, 7, 6, 5, 4, 3, 2, 1]
    assert fast["6"] == [8, 7, 6, 5, 4, 3, 2, 1]  # a width of 8: no band
    assert FW.snap({"0": 12, "3": 16, "6": 5}, fast) == {"0": 8, "3": 16, "6": 5}
    assert FW.fast_widths(cost, BandedTimer(), groups, {}, {g.id: 6 for g in groups})["6"] == [8, 7, 6]


def test_give_back_raises_while_the_target_holds(setup):
    model, groups, cost = setup
    fast = FW.fast_widths(cost, BandedTimer(), groups, {}, {g.id: 1 for g in groups})
    base = cost.base_macs

    def fits(c):
        return cost.metric(c, "macs") <= 0.6 * base

    start = {"0": 1, "3": 1, "6": 1}
    out = FW.give_back(cost, BandedTimer(), groups, start, fast, fits)
    assert fits(out) and all(out[g] in fast[g] and out[g] >= start[g] for g in out)
    for g in out:  # nothing more could be given back
        wider = [w for w in fast[g] if w > out[g]]
        assert not wider or not fits({**out, g: wider[-1]})


def plan_ms(model, groups, sel) -> float:
    """The synthetic time of every conv of `model` under a selection's plan."""
    cost = CostModel(model, X)
    kept = {g.id: len(sel.keep.get(g.id, range(g.size))) for g in groups}
    return sum(banded_ms(*cost.layer_widths(name, kept)[:2]) for name in ("0", "3", "6"))


@pytest.mark.parametrize("reduction", [0.3, 0.5])
def test_selection_meets_the_target_with_fast_widths_only(setup, monkeypatch, reduction):
    model, groups, _ = setup
    monkeypatch.setattr(FW, "LayerTimer", BandedTimer)
    scores = Scores({g.id: torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in groups})
    plain = select(model, X, groups, scores, Target("macs", reduction))
    fast = select(model, X, groups, scores, Target("macs", reduction), latency_batch=64)
    assert fast.achieved >= reduction - 1e-9
    assert any(9 <= len(plain.keep.get(g, range(16))) <= 15 for g in ("0", "3"))  # the rule has work to do
    assert not any(9 <= len(fast.keep.get(g, range(16))) <= 15 for g in ("0", "3"))
    assert plan_ms(model, groups, fast) < plan_ms(model, groups, plain)


class FlatTimer(BandedTimer):
    def ms(self, name: str, in_width: int, out_width: int) -> float:
        return 1.0


def test_a_flat_landscape_still_reaches_the_target(setup, monkeypatch):
    """Where no width is faster than the full one, only the full width and the narrowest candidate are kept, and
    the target is still met by pruning some groups to the narrowest."""
    model, groups, cost = setup
    fast = FW.fast_widths(cost, FlatTimer(), groups, {}, {g.id: 4 for g in groups})
    assert fast == {"0": [16, 4], "3": [16, 4], "6": [8, 4]}
    monkeypatch.setattr(FW, "LayerTimer", FlatTimer)
    scores = Scores({g.id: torch.rand(g.size) for g in groups})
    assert select(model, X, groups, scores, Target("macs", 0.6), latency_batch=64).achieved >= 0.6


def test_real_layers_are_timed_once_per_shape():
    model = net()
    timer = FW.LayerTimer(model, X, batch=2, seconds=0.001)
    assert set(timer.convs) == {"0", "3", "6"} and timer.convs["3"][1] == (12, 12)
    before = len(timer._cache)
    assert timer.ms("3", 16, 16) > 0 and timer.ms("9", 8, 10) == 0.0  # the linear layer is not timed
    timer.ms("3", 16, 16)
    FW.LayerTimer(model, X, batch=2).ms("3", 16, 16)
    timer.ms("3", 12, 16)
    timer.measure([("3", 12, 16), ("3", 8, 16), ("3", 8, 16), ("9", 8, 10)])
    assert len(timer._cache) == before + 3
    assert not model.training
