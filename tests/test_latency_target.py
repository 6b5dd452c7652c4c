"""Latency targets: the knapsack's exact answer, the planner on a fixed fake latency table, the measured loop, the
on-disk cache (a second run times nothing), and the CLI's refusals."""

import itertools
import json

import numpy as np
import pytest
import torch
from helpers import three_conv_net as net
from helpers import train_digits_base
from typer.testing import CliRunner

from prune_cli.api import Scores
from prune_cli.cli import app
from prune_cli.errors import TargetUnreachable
from prune_cli.selection import fast_widths as FW
from prune_cli.selection import latency as L
from prune_cli.selection.plan import groups_in_scope
from prune_cli.surgery import CostModel, channel_groups

X = torch.randn(1, 3, 12, 12)


# ---------------------------------------------------------------------------------------------------- knapsack
def brute_force(values, costs, budget):
    best, pick = -np.inf, None
    for choice in itertools.product(*(range(len(v)) for v in values)):
        cost = sum(c[j] for c, j in zip(costs, choice, strict=True))
        value = sum(v[j] for v, j in zip(values, choice, strict=True))
        if cost <= budget and value > best:
            best, pick = value, list(choice)
    return best, pick


def test_knapsack_small_case_by_hand():
    # item 0: keep all (value 10, 6 ms), half (7, 3 ms), least (2, 1 ms); item 1 likewise with other numbers.
    values = [[10, 7, 2], [9, 8, 1]]
    costs = [[6, 3, 1], [5, 2, 1]]
    # budget 8: (all, half) = 18 at 8 ms beats (half, all) = 16 at 8 ms and (half, half) = 15 at 5 ms
    assert L.knapsack(values, costs, 8, resolution=6) == [0, 1]
    assert L.knapsack(values, costs, 5, resolution=3) == [1, 1]  # 15 at 5 ms
    assert L.knapsack(values, costs, 2, resolution=1) == [2, 2]  # only the cheapest fit
    with pytest.raises(ValueError):
        L.knapsack(values, costs, 1.5)


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force_on_integer_costs(seed):
    rng = np.random.default_rng(seed)
    values = [np.sort(rng.uniform(0, 10, 4))[::-1] for _ in range(4)]
    costs = [np.sort(rng.integers(1, 9, 4))[::-1].astype(float) for _ in range(4)]
    floors = sum(c.min() for c in costs)
    budget = floors + int(rng.integers(0, 12))
    resolution = max(1, int(budget - floors))  # steps of exactly 1 ms: the DP is exact
    pick = L.knapsack(values, costs, budget, resolution=resolution)
    best, _ = brute_force(values, costs, budget)
    assert sum(c[j] for c, j in zip(costs, pick, strict=True)) <= budget
    assert sum(v[j] for v, j in zip(values, pick, strict=True)) == pytest.approx(best)


def test_values_are_score_mass_shares_weighted_by_the_group_time():
    log = np.log
    assert L.values_of(torch.tensor([1.0, 3.0, 0.0, 4.0]), 2.0).tolist() == pytest.approx(
        [-np.inf, 2 * log(0.5), 2 * log(0.875), 0, 0]
    )
    assert L.values_of(torch.tensor([-1.0, 1.0])).tolist() == pytest.approx([-np.inf, 0, 0])  # shifted to >= 0
    assert L.values_of(torch.zeros(4)).tolist() == pytest.approx([-np.inf, *log([0.25, 0.5, 0.75, 1.0])])
    assert L.values_of(torch.ones(3), 0.0).tolist() == [0, 0, 0, 0]  # a group charged no time: no NaN


def test_equal_scores_and_linear_times_give_the_uniform_cut():
    # Three groups of 20 channels whose times are linear in width at different rates, every channel scored the same:
    # the most value under half (or 3/4) of the time is that share of every group. A linear value ties every plan of
    # that time, and the knapsack picked an extreme one: [17, 3, 12] and [10, 12, 17].
    widths = np.arange(20, 1, -1)
    rates = [1.0, 3.0, 7.0]
    values = [L.values_of(torch.ones(20), rate * 20)[widths] for rate in rates]
    costs = [rate * widths for rate in rates]
    for share, kept in [(0.5, 10), (0.75, 15)]:
        picks = L.knapsack(values, costs, share * sum(rate * 20 for rate in rates) + 0.5)  # + 0.5: above rounding
        assert [int(widths[j]) for j in picks] == [kept] * 3


# ----------------------------------------------------------------------------------------- a fixed fake table
class FakeTable:
    """Times from a formula (a conv layer costs in * out / 100 ms, 16 channels cost what 12 do: a fast width)."""

    key, timed, reused, timing_s = "fake", 0, 0, 0.0

    def __init__(self, model):
        self.timer = FW.LayerTimer(model, X, 1, seconds=0.0)
        self.calls = 0

    def measure(self, shapes):
        pass

    def ms(self, name, i, o):
        self.calls += 1

        def w(c):
            return 12 if 12 <= c <= 16 else c

        return w(i) * w(o) / 100.0 if name in self.timer.convs else 0.0


@pytest.fixture
def planner(monkeypatch):
    monkeypatch.setattr(FW.LayerTimer, "_time", lambda *a: 1.0)  # the fake table never times a layer
    model = net()
    groups = groups_in_scope(channel_groups(model, X), "all")
    return L.LatencyPlanner(CostModel(model, X), FakeTable(model), groups, round_to=1, max_ratio=0.75)


def test_planner_charges_each_layer_to_one_group(planner):
    assert planner.owned == {"0": ["0"], "3": ["3"], "6": ["6"]}  # each conv to the group of its outputs
    assert planner.candidates["0"] == list(range(16, 3, -1)) and planner.candidates["6"] == [8, 7, 6, 5, 4, 3, 2]
    costs = planner.costs(planner.full)
    assert costs["3"][0] == pytest.approx(12 * 12 / 100)  # conv "3": in 16 (charged as 12), out 16 (as 12)
    assert costs["6"][0] == pytest.approx(12 * 8 / 100)


def test_knapsack_plan_is_the_exact_best_on_a_fake_table(planner):
    gen = torch.Generator().manual_seed(0)
    scores = Scores({g.id: torch.rand(g.size, generator=gen) for g in planner.groups})
    costs = planner.costs(planner.full)
    budget = 0.6 * planner.predicted(planner.full, costs)
    counts = planner.by_scores(scores, budget, costs)
    values = {g.id: L.values_of(scores.per_group[g.id], costs[g.id][0]) for g in planner.groups}
    best, best_counts = -1.0, None
    ids = [g.id for g in planner.groups]
    for widths in itertools.product(*(planner.candidates[g] for g in ids)):
        plan = dict(zip(ids, widths, strict=True))
        if planner.predicted(plan, costs) <= budget + 1e-9:
            value = sum(values[g][plan[g]] for g in ids)
            if value > best + 1e-9:
                best, best_counts = value, plan
    assert planner.predicted(counts, costs) <= budget + 1e-9
    assert sum(values[g][counts[g]] for g in ids) == pytest.approx(best, abs=1e-6)
    assert counts == best_counts
    assert counts["0"] not in range(13, 16)  # 13-15 channels cost what 16 do: never worth keeping


def test_ratios_are_scaled_to_the_budget(planner):
    costs = planner.costs(planner.full)
    full = planner.predicted(planner.full, costs)
    counts = planner.by_ratios({"0": 0.5, "3": 0.25, "6": 0.0}, 0.7 * full, costs)
    assert planner.predicted(counts, costs) <= 0.7 * full and counts["6"] == 8 and counts["0"] <= counts["3"]


def fake_measure(planner, costs, scale=1.7, overhead=3.0):
    """Measured ms = overhead + scale * charged ms: not the table's scale, as on a real machine."""
    calls = []

    def measure(plans):
        calls.append(len(plans))
        base = overhead + scale * planner.predicted(planner.full, costs)
        return base, [overhead + scale * planner.predicted(p, costs) for p in plans]

    return measure, calls


@pytest.mark.parametrize("reduction", [0.2, 0.35])
def test_measured_loop_reaches_the_target_within_tolerance(planner, reduction):
    costs = planner.costs(planner.full)
    measure, calls = fake_measure(planner, costs)
    scores = Scores({g.id: torch.arange(g.size, 0, -1).float() for g in planner.groups})
    most, base_ms = L.reachable(planner, measure, reduction, 1, 0.02)
    assert 0.4 < most < 1 and base_ms > 3
    result = L.plan(planner, measure, reduction, scores=scores, tolerance=0.02, rounds=4, most=most)
    assert abs(result.achieved - reduction) <= 0.02 and 1 <= len(result.rounds) <= 4
    assert result.achieved == pytest.approx(1 - result.pruned_ms / result.base_ms)


def test_the_loop_reaches_the_target_when_the_narrowest_widths_cost_more_than_the_full_ones(planner, monkeypatch):
    """At batch 64 a very narrow conv can be slower than the full one: the budget bracket must start from the
    cheapest plan the table charges, not from the narrowest (which ran the loop to the full model)."""
    costs = planner.costs(planner.full)
    costs = {gid: np.concatenate([c[:-1], [3 * c[0]]]) for gid, c in costs.items()}  # narrowest: 3x the full width
    monkeypatch.setattr(planner, "costs", lambda ref: costs)
    measure, _ = fake_measure(planner, costs)
    scores = Scores({g.id: torch.arange(g.size, 0, -1).float() for g in planner.groups})
    result = L.plan(planner, measure, 0.3, scores=scores, tolerance=0.02, most=0.5)
    assert abs(result.achieved - 0.3) <= 0.02


def test_an_unreachable_latency_target_says_the_most_that_is_reachable(planner):
    measure, _ = fake_measure(planner, planner.costs(planner.full))
    with pytest.raises(TargetUnreachable, match=r"the most the constraints allow is \d+\.\d%"):
        L.reachable(planner, measure, 0.95, 1, 0.02)


# ------------------------------------------------------------------------------------------------- the cache
def test_a_second_run_times_nothing(tmp_path, monkeypatch):
    calls = []
    real = FW.LayerTimer._time

    def counting(self, *shape):
        calls.append(shape)
        return real(self, *shape)

    monkeypatch.setattr(FW.LayerTimer, "_time", counting)
    monkeypatch.setattr(FW.LayerTimer, "_cache", {})  # no help from this process's earlier timings
    model = net()
    groups = groups_in_scope(channel_groups(model, X), "all")
    cost = CostModel(model, X)

    def run():
        table = L.LatencyTable(model, X, 2, cache=tmp_path, seconds=0.0)
        costs = L.LatencyPlanner(cost, table, groups, max_ratio=0.5).costs({g.id: g.size for g in groups})
        table.save()
        return table, costs

    first, costs = run()
    assert calls and first.timed > 0 and first.reused == 0
    assert json.loads(first.path.read_text())["key"] == first.key
    FW.LayerTimer._cache.clear()
    n = len(calls)
    second, again = run()
    assert len(calls) == n, "the second run timed layers the cache holds"
    assert second.timed == 0 and second.reused == first.timed
    assert all(np.array_equal(costs[g], again[g]) for g in costs)


def test_a_malformed_cache_file_reads_as_empty(tmp_path):
    table = L.LatencyTable(net(), X, 2, cache=tmp_path, seconds=0.0)
    table.path.parent.mkdir(parents=True)
    for text in ["not json", json.dumps({"key": table.key, "ms": {"0|3|16": "1; import os", "3|16|16": -1}}), "[]"]:
        table.path.write_text(text)
        assert L.LatencyTable(net(), X, 2, cache=tmp_path, seconds=0.0)._ms == {}


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(L.CACHE_ENV, str(tmp_path / "c"))
    assert L.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(L.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert L.cache_dir() == tmp_path / "x" / "prune-cli"


# ----------------------------------------------------------------------------------------------------- the CLI
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_digits_base(tmp_path_factory.mktemp("latency"), epochs=1)


@pytest.fixture
def quick_timing(tmp_path, monkeypatch):
    """A cache folder of the test's own, and short timings (what is timed does not matter here, only the flow)."""
    from prune_cli import metrics

    monkeypatch.setenv(L.CACHE_ENV, str(tmp_path / "cache"))
    plan_timer, side_by_side = L.plan_timer, metrics.time_side_by_side
    monkeypatch.setattr(L, "plan_timer", lambda *a, **k: plan_timer(*a, **{**k, "seconds": 0.1}))
    monkeypatch.setattr(metrics, "time_side_by_side", lambda *a, **k: side_by_side(*a, **{**k, "latency_seconds": 0.1}))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-latency", "0"], "--target-latency must be in (0, 1)"),
        (["--target-latency", "1"], "--target-latency must be in (0, 1)"),
        (["--target-latency", "-0.2"], "--target-latency must be in (0, 1)"),
        (["--target-latency", "0.3", "--target-macs", "0.3"], "exactly one of"),
        (["--target-latency", "0.3", "--latency-batch", "0"], "--latency-batch must be >= 1"),
        (["--target-latency", "0.3", "--runtime", "tensorrt"], "--runtime must be one of"),
        (["--target-latency", "0.99", "--max-ratio", "0.5"], "the most the constraints allow is"),
    ],
)
def test_bad_latency_targets_exit_2_in_one_line(base, tmp_path, quick_timing, args, message):
    out = tmp_path / "p.safetensors"
    result = runner.invoke(app, ["prune", str(base), "--out", str(out), "--latency-batches", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_a_criterion_that_chooses_its_widths_says_it_ignores_the_latency_target(base, quick_timing):
    result = runner.invoke(app, ["prune", str(base), "--criterion", "similarity", "--target-latency", "0.3",
                                 "--latency-batches", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--target-latency ignored: similarity chooses its own widths" in result.stderr
    assert json.loads(result.stdout)["target_report"]["metric"] == "macs"


@pytest.mark.slow
def test_prune_to_a_latency_target_end_to_end(base, quick_timing):
    result = runner.invoke(app, ["prune", str(base), "--target-latency", "0.3", "--latency-batch", "8",
                                 "--latency-batches", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    report = summary["target_report"]
    assert report["metric"] == "latency" and report["requested"] == 0.3 and report["latency_batch"] == 8
    assert 1 <= len(report["rounds"]) <= 6 and report["table"]["timed"] > 0
    assert "latency_b8_ms" in summary["after"] and summary["after"]["runtime"] == "torch"
    again = runner.invoke(app, ["prune", str(base), "--target-latency", "0.3", "--latency-batch", "8",
                                "--latency-batches", "1", "--json"])  # fmt: skip
    assert json.loads(again.stdout)["target_report"]["table"]["reused"] > 0
