"""SINF on a tiny VGG trained briefly on digits: routing, MAC accounting, files, clusters, the CLI."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

import models
from models.vgg import VGG
from prune_cli import engine, metrics
from prune_cli.cli import app
from prune_cli.data import splits as D
from prune_cli.sinf import model as sinf
from prune_cli.sinf import report as sinf_report
from prune_cli.store.modelfile import save_model

TINY = "sinf_test_tiny_vgg"
if TINY not in models.MODELS:

    @models.register_model(TINY)
    def tiny_vgg(num_classes: int = 10, in_channels: int = 3) -> VGG:
        return VGG([8, "M", 16, "M", 32, 32, "M", 32], num_classes, in_channels)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny layers: one thread avoids OpenMP spinning on a shared 2-core machine (minutes -> seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def splits():
    return D.make_splits(D.load_dataset("digits"), seed=0)


@pytest.fixture(scope="module")
def base(splits):
    torch.manual_seed(0)
    model = models.create_model(TINY, num_classes=splits.num_classes, in_channels=1)
    engine.train(model, splits, engine.TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=0), evaluate_val=False)
    model.prune_cli_info = {"dataset": "digits", "seed": 0}
    return model.eval()


CFG = sinf.SinfConfig(clusters=3, r_M=0.1, r_L=0.5, router_epochs=15, dcs_images_per_class=60, threshold=0.6)


@pytest.fixture(scope="module")
def built(base, splits):
    return sinf.build(base, splits, CFG, device=torch.device("cpu"), log=lambda message: None)


def test_routed_output_equals_extractor_then_chosen_subgraph(built, splits):
    model = built.model
    x = D.to_float(splits.test.x[:40], splits)
    with torch.no_grad():
        out = model(x)
        h = model.extractor(x)
        chosen = model.router(h).argmax(1)
        assert torch.equal(model.last_route, chosen)
        assert len(chosen.unique()) > 1  # the check covers more than one subgraph
        for i in range(len(x)):
            m = int(chosen[i])
            by_hand = model.subgraphs[m](h[i : i + 1])[0]
            if model.restrict:  # the classes outside the routed cluster are ruled out
                by_hand = by_hand.masked_fill(~model.allowed[m], float("-inf"))
            assert torch.allclose(out[i], by_hand, atol=1e-5)
        # gamma = 1: every input falls back to the full model, whose output is the base's.
        model.gamma = 1.0
        try:
            assert torch.allclose(model(x), built.base(x), atol=1e-5)
            assert (model.last_route == -1).all()
        finally:
            model.gamma = CFG.gamma


def test_restrict_keeps_predictions_inside_the_routed_cluster(built, splits):
    model = built.model
    x = D.to_float(splits.test.x[:40], splits)
    assert model.restrict  # the default
    with torch.no_grad():
        pred = model(x).argmax(1)
        for p, m in zip(pred.tolist(), model.last_route.tolist(), strict=True):
            assert p in model.clusters[m]
        model.restrict = False
        try:
            free = model(x)
        finally:
            model.restrict = CFG.restrict
    h = model.extractor(x)
    assert torch.isfinite(free).all()
    assert torch.allclose(free[:1], model.subgraphs[int(model.last_route[0])](h[:1]), atol=1e-5)


def test_macs_per_input_are_the_sum_of_the_parts(built, splits):
    model = built.model
    x = D.to_float(splits.test.x[:12], splits)
    parts = sinf_report.macs_parts(model, x[:1])
    assert parts["full_tail"] + parts["extractor"] == metrics.count_macs(built.base, x[:1])
    assert parts["router"] > 0 and all(0 < s < parts["full_tail"] for s in parts["subgraphs"])
    for i in range(len(x)):
        counted = metrics.count_macs(model, x[i : i + 1])  # the whole routed forward pass, counted
        m = int(model.last_route[0])
        assert counted == parts["extractor"] + parts["router"] + parts["subgraphs"][m]
    result = sinf_report.evaluate(built, splits.test, splits)
    with torch.no_grad():
        model(D.to_float(splits.test.x, splits))
    mean_sub = sum(parts["subgraphs"][int(m)] for m in model.last_route) / len(splits.test)
    expected = parts["extractor"] + parts["router"] + mean_sub
    assert result["macs_per_input"] == pytest.approx(expected)
    assert result["macs_reduction"] == pytest.approx(1 - expected / result["base_macs"])
    assert result["images"] == len(splits.test) and 0 <= result["top1"] <= 1
    assert result["bn_recalibration"] is True and result["restrict"] is True  # the decisions, stated in the result
    assert sum(c["images"] for c in result["per_cluster"]) == len(splits.test)


def test_subgraphs_follow_the_removal_schedule_and_leave_the_extractor_alone(built, splits):
    fractions = sinf.removal_fractions(len(built.groups), CFG.r_M, CFG.r_L)
    assert fractions[0] == pytest.approx(CFG.r_M) and fractions[-1] == pytest.approx(CFG.r_L)
    assert all(b >= a for a, b in zip(fractions, fractions[1:], strict=False))
    base_widths = {n: m.out_channels for n, m in built.base.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for widths in built.widths:
        for g, r in zip(built.groups, fractions, strict=True):
            producer = g.producers[0].module
            assert widths[producer]["out"] == max(1, round(g.size * (1 - r)))
        before_cut = [n for n in base_widths if n not in {g.producers[0].module for g in built.groups}]
        assert all(widths[n]["out"] == base_widths[n] for n in before_cut)


def test_save_and_reload_give_identical_outputs(built, splits, tmp_path):
    sinf.save(built, tmp_path / "s", dataset="digits", seed=0)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["base.safetensors", "router.safetensors", "scores.safetensors", "sinf.json",
                     "subgraphs.safetensors"]  # fmt: skip
    loaded = sinf.load(tmp_path / "s")
    x = D.to_float(splits.test.x[:64], splits)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), built.model(x))
    assert loaded.model.clusters == built.model.clusters
    for a, b in zip(loaded.scores, built.scores, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert [g.id for g in loaded.groups] == [g.id for g in built.groups]


def test_clusters_from_features_and_from_superclasses():
    # Classes 0/1, 2/3 and 4 have close feature means: Ward puts them together.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [5, 1, 0], [0, 5, 0], [1, 5, 0], [0, 0, 5]])
    y = torch.arange(5).repeat_interleave(20)
    feats = centres[y] + 0.1 * torch.randn(len(y), 3, generator=g)
    assert sinf.feature_clusters(feats, y, 5, 3) == [[0, 1], [2, 3], [4]]
    split = D.Split(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 2, 0]),
                    torch.tensor([1, 0, 1, 0, 1, 1]))  # fmt: skip
    assert sinf.superclass_clusters(split, 4) == [[0, 2], [1, 3]]
    assert sinf.superclass_clusters(dataclasses.replace(split, coarse=None), 4) is None


def test_sweep_writes_table_and_plot(built, splits, tmp_path):
    rows = sinf_report.sweep(built, splits.test, splits, r_L_grid=(0.7, 0.3), r_M_grid=(0.1,),
                             device=torch.device("cpu"))  # fmt: skip
    assert [(r["r_M"], r["r_L"]) for r in rows] == [(0.1, 0.7), (0.1, 0.3)]
    assert rows[0]["macs_per_input"] < rows[1]["macs_per_input"] < rows[0]["base_macs"]
    files = sinf_report.write_sweep(rows, tmp_path)
    assert [f.name for f in files] == ["sweep.csv", "sweep.md", "sweep.png"]
    assert files[2].read_bytes()[:4] == b"\x89PNG"
    assert "| r_M | r_L | top1" in files[1].read_text()


def test_cli_build_and_eval(base, tmp_path):
    model_file = tmp_path / "tiny.safetensors"
    save_model(base, model_file, dataset="digits", seed=0)
    runner = CliRunner()
    out = tmp_path / "sinf"
    result = runner.invoke(app, ["sinf", "build", str(model_file), "--out", str(out), "--clusters", "3",
                                 "--router-epochs", "10", "--dcs-images-per-class", "40", "--json", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and len(summary["clusters"]) == 3
    result = runner.invoke(app, ["sinf", "eval", str(out), "--latency-batches", "1,8", "--json", "-q"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["macs_per_input"] < row["base_macs"] and row["sinf_latency_b8_ms"] > 0
    assert row["storage"]["subgraphs_params_total"] > 0
    result = runner.invoke(app, ["sinf", "eval", str(tmp_path)])
    assert result.exit_code == 2 and "not a SINF folder" in result.output


def test_full_fallback_reports_the_base_and_keeps_route_accuracy(built, splits):
    routed = sinf_report.evaluate(built, splits.test, splits)
    built.model.gamma = 1.0
    try:
        fallback = sinf_report.evaluate(built, splits.test, splits)
    finally:
        built.model.gamma = CFG.gamma
    assert fallback["fallback_rate"] == 1.0 and fallback["top1"] == pytest.approx(fallback["base_top1"])
    assert fallback["route_acc"] == pytest.approx(routed["route_acc"])  # the router's choice, used or not
    assert fallback["macs_per_input"] == fallback["base_macs"] + fallback["macs_router"]


def _candidates(n: int) -> list:
    from prune_cli.surgery.split import Candidate

    return [Candidate(f"node{i}", f"layer{i}", 8, (4, 4)) for i in range(n)]


@pytest.mark.parametrize(
    ("accuracies", "chosen", "trained"),
    [
        ([0.5, 0.8, 0.9, 0.95], 1, 2),  # the earliest at or above the threshold, not the best; later ones untrained
        ([0.5, 0.75, 0.9], 1, 2),  # exactly at the threshold counts
        ([0.8, 0.5, 0.9], 0, 1),  # the first candidate already qualifies
        ([0.5, 0.7, 0.6, 0.7], 1, 4),  # none reaches it: the most accurate, the earliest of equals
    ],
)
def test_router_attaches_at_the_earliest_candidate_reaching_the_threshold(accuracies, chosen, trained):
    candidates = _candidates(len(accuracies))
    fitted = []

    def fit(c):
        fitted.append(c.node)
        return sinf.Router(c.channels, 3), accuracies[int(c.node[4:])]

    cand, router, acc, tried = sinf.attach_router(candidates, fit, threshold=0.75)
    assert cand == candidates[chosen] and acc == accuracies[chosen]
    assert isinstance(router, sinf.Router)
    assert fitted == [c.node for c in candidates[:trained]]
    assert [t["val_cluster_acc"] for t in tried] == accuracies[:trained]


def test_build_attaches_where_the_rule_says(built):
    """The built model's cut is the first tried candidate at or above the threshold (or the best if none is)."""
    tried = built.manifest["router"]["candidates"]
    accs = [t["val_cluster_acc"] for t in tried]
    reached = [i for i, a in enumerate(accs) if a >= CFG.threshold]
    expected = reached[0] if reached else max(range(len(accs)), key=lambda i: (accs[i], -i))
    assert reached == ([len(tried) - 1] if reached else [])  # training stopped at the first one that qualified
    assert built.cut == tried[expected]["node"] and built.manifest["router"]["val_cluster_acc"] == accs[expected]


def _kept_channels(built, m: int, g) -> torch.Tensor:
    """Indices of group g's channels that cluster m's subgraph kept, read back from its BatchNorm's gamma."""
    bn = g.norms[0].module
    base_gamma = built.base.get_submodule(bn).weight.detach()
    tail_gamma = built.model.subgraphs[m].get_submodule(bn).weight.detach()
    assert len(base_gamma.unique()) == len(base_gamma)  # the gammas identify the channels
    return torch.tensor([int((base_gamma == v).nonzero()) for v in tail_gamma])


def test_each_cluster_keeps_its_own_top_dcs_channels(built, splits):
    from criteria.dcs import dcs_scores

    fractions = sinf.removal_fractions(len(built.groups), CFG.r_M, CFG.r_L)
    kept_sets = []
    # The stored scores are DCS on a cluster's own training images, not another cluster's (one cluster checked).
    classes = built.model.clusters[0]
    idx = sinf.cluster_images(splits.train.y, classes, CFG.dcs_images_per_class, others=len(classes) == 1)
    x = D.to_float(splits.train.x[idx], splits)
    fresh = dcs_scores(built.base, built.groups, x, splits.train.y[idx], classes=classes, options=CFG.dcs)
    assert all(torch.allclose(built.scores[0][g.id], fresh[g.id], atol=1e-6) for g in built.groups)
    for m in range(len(built.model.clusters)):
        per_group = []
        for g, r in zip(built.groups, fractions, strict=True):
            kept = _kept_channels(built, m, g)
            removed = torch.ones(g.size, dtype=torch.bool)
            removed[kept] = False
            assert len(kept) == max(1, round(g.size * (1 - r)))
            s = built.scores[m][g.id]
            if removed.any():  # every kept channel scores at least as high as every removed one
                assert s[kept].min() >= s[removed].max()
            per_group.append(frozenset(kept.tolist()))
        kept_sets.append(per_group)
    assert len({tuple(k) for k in kept_sets}) > 1  # clusters do keep different channels
