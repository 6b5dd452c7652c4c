"""HASTE (arXiv 2309.17211): hashing convs, their two paths, per-input MACs, the L search, save/reload."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import models
from criteria.haste import HashConv2d, Haste, eligible_convs, hash_layers, sparse_hyperplanes
from prune_cli.api import Context, Dynamic, Target, check_result, get_criterion
from prune_cli.api.dynamic import per_input_macs
from prune_cli.errors import BadValue, TargetUnreachable
from prune_cli.metrics import count_macs
from prune_cli.store.modelfile import load_model, save_model
from prune_cli.testing import make_context


class Trap:
    """Calibration data that fails the test if anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"HASTE read calibration data ({name})")

    def __len__(self):
        raise AssertionError("HASTE read calibration data (len)")


def haste(model, x, target=0.5, **options):
    cls = get_criterion("haste")
    result = check_result(cls(cls.Options(**options)).run(make_context(model, x, target=target)), ())
    assert isinstance(result, Dynamic) and result.hooks is None
    return result


class Small(nn.Module):
    """stem 3->4, then two 3x3 convs (4->6 stride 1, 6->5 stride 2), linear; for 8x8 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
        self.fc = nn.Linear(5 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.a(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.b(x)).flatten(1))


def test_haste_touches_no_data(tiny_resnet, example_input):
    assert get_criterion("haste").needs == frozenset()
    for calib in (None, Trap()):  # neither the search nor the wrapping reads the context's data
        Haste().run(make_context(tiny_resnet, example_input, calib=calib))


def test_every_channel_its_own_bucket_costs_dense_plus_hashing(tiny_resnet, monkeypatch):
    x = torch.randn(3, 3, 16, 16)
    model = haste(tiny_resnet, x[:1], hyperplanes=6).model
    monkeypatch.setattr(
        HashConv2d, "codes", lambda self, tiles, g: torch.arange(tiles.shape[2]).expand(tiles.shape[:3])
    )
    total, overhead = per_input_macs(model, x)
    hashing = 0
    for m in hash_layers(model):
        g = m.geometry(*_input_size(model, m, x), x.device)
        d = g["th"] * g["tw"]
        nnz = int((m.planes != 0).sum())
        hashing += g["nh"] * g["nw"] * m.in_channels * (d + nnz)  # centring + sparse projections, per tile
    assert hashing > 0
    assert torch.equal(overhead, torch.full((3,), float(hashing), dtype=torch.float64))
    assert torch.equal(total, torch.full((3,), float(count_macs(tiny_resnet, x[:1]) + hashing), dtype=torch.float64))
    with torch.no_grad():  # singleton buckets merge nothing: the outputs are the base model's
        assert torch.allclose(model(x), tiny_resnet(x), rtol=1e-4, atol=1e-5)


def _input_size(model, layer, x):
    sizes = []
    h = layer.register_forward_hook(lambda m, a, o: sizes.append(tuple(a[0].shape[2:])))
    with torch.no_grad():
        model(x[:1])
    h.remove()
    return sizes[0]


def test_one_bucket_per_tile_costs_as_computed_by_hand():
    torch.manual_seed(0)
    base = Small().eval()
    x = torch.randn(2, 3, 8, 8)
    model = haste(base, x[:1], hyperplanes=0).model  # L = 0: every tile's channels form one bucket
    assert [type(m) for m in (model.stem, model.a, model.b)] == [nn.Conv2d, HashConv2d, HashConv2d]
    # a: 4->6, stride 1, 8x8 out: 3x3 = 9 tiles of 3x3 outputs, input tile 5x5 (d = 25), n_b = 1
    a_conv = 1 * 6 * 9 * 64  # one merged channel, all 64 output pixels
    a_over = 9 * (3 * 25 + 25) + 9 * 3 * 6 * 9  # input merge (3 sums + 1 scaling per pixel), filter merge
    # b: 6->5, stride 2, 4x4 out: 2x2 = 4 tiles (the last row/column of tiles partly outside), input tile 7x7
    b_conv = 1 * 5 * 9 * 16
    b_over = 4 * (5 * 49 + 49) + 4 * 5 * 5 * 9
    static = 4 * 3 * 9 * 64 + 80 * 10  # stem, fc
    total, overhead = per_input_macs(model, x)
    assert torch.equal(overhead, torch.full((2,), float(a_over + b_over), dtype=torch.float64))
    assert torch.equal(total, torch.full((2,), float(static + a_conv + a_over + b_conv + b_over), dtype=torch.float64))
    assert a_conv + a_over + b_conv + b_over < count_macs(base, x[:1]) - static


CASES = [(1, (8, 8), 4, "channel"), (1, (10, 7), 6, "own"), (2, (9, 12), 3, "channel"), (2, (16, 16), 0, "own")]


@pytest.mark.parametrize(("stride", "size", "n_planes", "center"), CASES)
def test_simulated_and_reduced_paths_agree(stride, size, n_planes, center):
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(6, 5, 3, stride, 1, bias=True).double()
    t = 2 * stride + 3
    layer = HashConv2d.from_conv(conv, sparse_hyperplanes(n_planes, t * t, 2 / 3, g), 3, center).double()
    x = torch.randn(4, 6, *size, dtype=torch.float64, generator=g).relu()
    outs, macs = {}, {}
    for path in ("simulate", "reduced"):
        layer.path = path
        outs[path], macs[path] = layer(x), layer.last_macs
    assert outs["simulate"].shape == conv(x).shape
    assert torch.allclose(outs["simulate"], outs["reduced"], rtol=1e-10, atol=1e-12)
    assert torch.equal(macs["simulate"], macs["reduced"])
    assert not torch.allclose(outs["simulate"], conv(x), atol=1e-3)  # merging did change something
    for path in ("tile_groups",):  # several GEMM groups give the same result
        layer.path, layer.tile_groups = "reduced", 3
        assert torch.allclose(layer(x), outs["simulate"], rtol=1e-10, atol=1e-12), path


def test_paths_agree_in_a_whole_model(tiny_resnet):
    x = torch.randn(3, 3, 16, 16)
    model = haste(tiny_resnet, x[:1], hyperplanes=5).model
    with torch.no_grad():
        batched = model(x)  # simulate (batch > 1)
        batched_macs = per_input_macs(model, x)[0]
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])  # reduced (batch 1)
        single_macs = torch.cat([per_input_macs(model, x[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(batched, single, rtol=1e-4, atol=1e-4 * batched.abs().max())
    assert torch.equal(batched_macs, single_macs)


def test_identical_channels_merge_exactly():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 4, 3, 1, 1, bias=False).double()
    layer = HashConv2d.from_conv(conv, sparse_hyperplanes(30, 25, 2 / 3, g), 3, "channel").double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=g).repeat(1, 2, 1, 1)  # channel c == channel c + 4
    for path in ("simulate", "reduced"):
        layer.path = path
        assert torch.allclose(layer(x), conv(x), rtol=1e-10, atol=1e-12)
        conv_macs = layer.last_macs - layer.last_overhead
        assert torch.all(conv_macs <= 4 * 4 * 9 * 81)  # at most 4 distinct channels per tile


def test_stem_is_never_hashed_and_start_layer_counts_3x3_convs(tiny_resnet, example_input):
    names = eligible_convs(tiny_resnet)
    assert names[0] == "conv1" and "layer2.0.shortcut.0" not in names
    model = haste(tiny_resnet, example_input, hyperplanes=2).model
    assert not isinstance(model.conv1, HashConv2d)
    assert [n for n, m in model.named_modules() if isinstance(m, HashConv2d)] == names[1:]
    later = haste(tiny_resnet, example_input, hyperplanes=2, start_layer=7).model
    assert [n for n, m in later.named_modules() if isinstance(m, HashConv2d)] == names[7:]
    assert not isinstance(tiny_resnet.layer1[0].conv1, HashConv2d)  # the context's model is left alone
    with pytest.raises(BadValue):
        haste(tiny_resnet, example_input, hyperplanes=2, start_layer=0)


def test_search_finds_the_largest_L_meeting_the_target(tiny_resnet, example_input):
    result = haste(tiny_resnet, example_input, target=0.4, search_images=8)
    L, search = result.extra["hyperplanes"], result.extra["search"]
    assert search["input"] == "smooth-noise" and 0 < L < 62
    tried = {int(k): v for k, v in search["tried"].items()}
    budget = 0.6 * search["base_macs"]
    assert tried[L] <= budget and tried[L + 1] > budget
    assert list(tried.values()) == sorted(tried.values())  # MACs grow with L (the buckets only refine)
    assert all(m.planes.shape[0] == L for m in hash_layers(result.model))
    assert result.config["layers"] == {n: L for n in eligible_convs(tiny_resnet)[1:]}


def test_unreachable_and_params_targets_are_refused(tiny_resnet, example_input):
    with pytest.raises(TargetUnreachable):
        haste(tiny_resnet, example_input, target=0.95, search_images=2)
    ctx = Context(tiny_resnet, (), (), example_input, 10, Target("params", 0.3))
    with pytest.raises(BadValue, match="MACs"):
        Haste().run(ctx)


def test_safetensors_round_trip_rebuilds_identical_model(tmp_path, example_input):
    base = models.create_model("resnet20").eval()
    result = haste(base, example_input, hyperplanes=7)
    model, config = result.model, result.config
    x = torch.randn(2, 3, 16, 16)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = get_criterion(config["criterion"]).rebuild(models.create_model("resnet20"), config)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x)) and torch.equal(fresh(x[:1]), model(x[:1]))
    # through the project's model file (architecture JSON + re-wrapping on load)
    model.prune_cli_arch, model.prune_cli_dynamic = base.prune_cli_arch, config
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(per_input_macs(loaded, x)[0], per_input_macs(model, x)[0])
