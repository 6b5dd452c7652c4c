"""The shared per-input cost protocol of dynamic models (prune_cli.api.dynamic)."""

import itertools

import pytest
import torch
from helpers import concat_net
from torch import fx, nn

import models
from prune_cli import metrics
from prune_cli.api.dynamic import DynamicModule, is_dynamic, per_input_macs
from prune_cli.api.graph import trace
from prune_cli.data.splits import load_dataset, make_splits
from prune_cli.errors import UnsupportedGraph
from prune_cli.surgery import channel_groups


class HalfConv(DynamicModule, nn.Module):
    """A toy dynamic module: a conv whose recorded cost is (sample index + 1) * 1000, overhead 7 per sample."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.inner = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        self.refuse_proxy(x)
        n = x.shape[0]
        macs = (torch.arange(n, dtype=torch.float64) + 1) * 1000
        self.record_lazy(lambda: (macs + 7, torch.full((n,), 7.0)))
        return self.inner(x) if n > 0 else x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dyn = HalfConv(4, 5)
        self.fc = nn.Linear(5 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.dyn(torch.relu(self.stem(x)))), 1))


@pytest.mark.parametrize("factory", [lambda: models.create_model("resnet20"), lambda: models.create_model("vgg11"),
                                     concat_net])  # fmt: skip
def test_static_models_count_as_metrics_does(factory):
    model = factory().eval()
    x = torch.randn(3, 3, 16, 16)
    total, overhead = per_input_macs(model, x)
    assert total.shape == (3,) and total.dtype == torch.float64
    assert torch.equal(total, torch.full((3,), float(metrics.count_macs(model, x[:1])), dtype=torch.float64))
    assert torch.equal(overhead, torch.zeros(3, dtype=torch.float64))
    assert not is_dynamic(model)


def test_records_plus_static_layers_outside_dynamic_modules():
    net = Net().eval()
    x = torch.randn(3, 3, 8, 8)
    total, overhead = per_input_macs(net, x)
    static = 4 * 3 * 9 * 64 + 5 * 64 * 10  # stem + fc; the conv inside the dynamic module is not counted again
    assert torch.equal(total, torch.tensor([1007.0, 2007.0, 3007.0], dtype=torch.float64) + static)
    assert torch.equal(overhead, torch.full((3,), 7.0, dtype=torch.float64))
    assert is_dynamic(net)
    # chunks restart the per-sample records: sample index counts within each chunk
    chunked, _ = per_input_macs(net, x, batch_size=2)
    assert torch.equal(chunked, torch.tensor([1007.0, 2007.0, 1007.0], dtype=torch.float64) + static)


def test_lazy_record_is_evaluated_once_on_read():
    calls = []
    m = HalfConv(2, 2)

    def fn():
        calls.append(1)
        return torch.ones(1), torch.zeros(1)

    m.record_lazy(fn)
    assert calls == []
    assert m.last_macs.dtype == torch.float64 and float(m.last_overhead[0]) == 0.0 and float(m.last_macs[0]) == 1.0
    assert calls == [1]
    m.clear_record()
    assert m.last_macs is None and m.last_overhead is None


def test_dynamic_modules_are_fx_leaves():
    net = Net().eval()
    gm = trace(net)  # the project's one fx trace
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "dyn", "fc"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), net(x))
    with pytest.raises(UnsupportedGraph, match="fx leaf"):
        fx.symbolic_trace(net)  # the default tracer enters modules defined outside torch.nn


def test_surgery_reads_dynamic_convs_as_their_base_layers():
    from criteria import haste, manidp

    base = models.create_model("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    want = [(g.id, g.size, g.members) for g in channel_groups(base, x)]
    hashed = haste.wrap(
        models.create_model("resnet20").eval(), {"layer1.0.conv1": torch.zeros(2, 25, dtype=torch.int8)}, 3, "channel"
    )
    gated = manidp.wrap(models.create_model("resnet20").eval(), {"gate_init": "identity"})
    for model in (hashed, gated):
        assert is_dynamic(model)
        assert [(g.id, g.size, g.members) for g in channel_groups(model, x)] == want


class Recorder(nn.Module):
    """Remembers every batch it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen.append(x.clone())
        return x


def test_latency_takes_the_pool_batch_by_batch():
    """A dynamic model's time depends on its input: the latency passes walk through the given images in turn
    (a repeated input would only ever hit caches); a pool smaller than a batch is repeated to fill it."""
    pool = torch.arange(10.0).view(10, 1, 1, 1)
    m = Recorder()
    lat = metrics.measure_latency(m, (1, 1, 1), 2, pool=pool, repeats=7, warmup=3)
    assert lat.repeats == 7 and len(m.seen) == 10
    firsts = [int(b[0]) for b in m.seen]
    assert firsts == [0, 2, 4, 6, 8, 0, 2, 4, 6, 8] and all(len(b) == 2 for b in m.seen)
    m.seen.clear()
    metrics.measure_latency(m, (1, 1, 1), 4, pool=pool[:3], repeats=2, warmup=0)
    assert [b.flatten().tolist() for b in m.seen] == [[0, 1, 2, 0]] * 2
    m.seen.clear()
    metrics.measure_latency(m, (1, 1, 1), 3, repeats=2, warmup=0)  # no pool: one random batch, repeated
    assert m.seen[0].shape == (3, 1, 1, 1) and torch.equal(m.seen[0], m.seen[1])


def test_models_timed_side_by_side_take_turns():
    """Latencies to be compared are timed in alternating turns, so a drift of the CPU's speed reaches both alike."""
    splits = make_splits(load_dataset("digits"))
    order = []

    class Named(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, nn.Parameter(torch.zeros(1))

        def forward(self, x):
            order.append(self.name)
            return x

    out = metrics.time_side_by_side(
        [Named("a"), Named("b")], splits, latency_batches=(1, 4), latency_seconds=0.01, rounds=3
    )
    assert [name for name, _ in itertools.groupby(order)] == ["a", "b"] * 6  # 3 turns each per batch size
    assert all(set(o) >= {"latency_b1_ms", "latency_b4_ms", "threads", "load_average"} for o in out)


def test_sinf_and_its_base_are_timed_in_turns():
    from types import SimpleNamespace

    from prune_cli.sinf import report as sinf_report

    splits = make_splits(load_dataset("digits"))
    order = []

    def named(name):
        def forward(x):
            order.append(name)
            return x

        return forward

    sinf = SimpleNamespace(base=named("base"), model=named("sinf"))
    out = sinf_report.latencies(sinf, splits.test, splits, (1,), device=torch.device("cpu"), max_seconds=0.01)
    assert [name for name, _ in itertools.groupby(order)] == ["base", "sinf"] * 4
    assert set(out) == {f"{m}_latency_b1_{k}" for m in ("base", "sinf") for k in ("ms", "spread_ms")}
