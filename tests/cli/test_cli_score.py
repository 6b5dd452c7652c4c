"""`prune-cli score`: CSV per result type, the sensitivity sweep files, `--criterion all`, refusals."""

import csv

import pytest
import torch
from typer.testing import CliRunner

import models
from prune_cli.api import Plan, Scores, get_criterion, list_criteria
from prune_cli.cli import app
from prune_cli.cli import score as S
from prune_cli.report import correlations
from prune_cli.store.modelfile import save_model

runner = CliRunner()
FAST_SENS = ["--calib-images", "48", "--opt", "sensitivity.levels=0.3,0.7", "--opt", "sensitivity.trials=1"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two untrained ResNet-20 files for digits (scoring needs no trained weights to be exercised)."""
    folder = tmp_path_factory.mktemp("score")
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models.create_model("resnet20", num_classes=10, in_channels=1)
        out.append(save_model(model, folder / f"m{seed}.safetensors", kind="base", dataset="digits", seed=seed))
    return out


def test_score_l1_writes_channel_rows(files, tmp_path):
    out = tmp_path / "l1.csv"
    result = run("score", files[0], "--criterion", "l1", "--target-macs", "0.4", "--out", out)
    assert result.exit_code == 0, result.output
    rows = read(out)
    assert list(rows[0]) == ["group", "channel", "score", "rank", "kept"]
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    assert len(groups) == 9 and sum(len(v) for v in groups.values()) == 3 * (16 + 32 + 64)
    for members in groups.values():  # kept channels are exactly the best-ranked ones
        assert sorted(int(r["rank"]) for r in members) == list(range(1, len(members) + 1))
        n_kept = sum(int(r["kept"]) for r in members)
        assert 0 < n_kept < len(members)
        assert all(int(r["kept"]) == (int(r["rank"]) <= n_kept) for r in members)
    assert "requested 0.400" in result.stdout


def test_score_sensitivity_writes_ratios_sweep_and_plot(files, tmp_path):
    out = tmp_path / "sens.csv"
    result = run("score", files[0], "-c", "sensitivity", "--out", out, *FAST_SENS)
    assert result.exit_code == 0, result.output
    rows = read(out)
    assert list(rows[0])[:4] == ["group", "size", "ratio", "kept"] and "sensitivity" in rows[0]
    assert all(0 <= float(r["ratio"]) <= 0.9 for r in rows) and len(rows) == 9
    sweep = read(tmp_path / "sens_sweep.csv")
    assert list(sweep[0]) == ["group", "level", "trial", "accuracy", "loss"] and len(sweep) == 9 * 2
    assert (tmp_path / "sens_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_checkpoint_reports_rank_correlations(files, tmp_path):
    out = tmp_path / "sens.csv"
    result = run(
        "score",
        files[0],
        "-c",
        "sensitivity",
        "--out",
        out,
        "--compare-checkpoint",
        files[1],
        *FAST_SENS,
        "--opt",
        "sensitivity.measure=loss",
    )  # untrained models: accuracy drops may all tie
    assert "nan" not in result.stdout
    assert result.exit_code == 0, result.output
    assert "Spearman rho" in result.stdout and "Kendall tau" in result.stdout
    compare = read(tmp_path / "sens_compare.csv")
    assert len(compare) == 9 and sorted(int(r["rank_a"]) for r in compare) == list(range(1, 10))


def test_criterion_all_writes_spearman_matrix(files, tmp_path, monkeypatch):
    """A fast subset (a Scores, a data-driven Scores and an Allocation criterion); the slow test runs them all."""
    monkeypatch.setattr(S, "static_criteria", lambda: ["dcs", "l1", "sensitivity"])
    out = tmp_path / "all.csv"
    result = run("score", files[0], "-c", "all", "--out", out, *FAST_SENS)
    assert result.exit_code == 0, result.output
    matrix = read(tmp_path / "all_spearman.csv")
    names = [r["criterion"] for r in matrix]
    assert names == ["dcs", "l1", "sensitivity"] and list(matrix[0]) == ["criterion", *names]
    cell = {(r["criterion"], b): float(r[b]) for r in matrix for b in names}
    assert all(cell[(n, n)] == pytest.approx(1.0) for n in names)
    assert cell[("l1", "sensitivity")] == pytest.approx(1.0)  # an allocation ranks inside groups by its rank (l1)
    assert cell[("dcs", "l1")] == pytest.approx(cell[("l1", "dcs")]) and abs(cell[("dcs", "l1")]) < 0.99
    assert {r["criterion"] for r in read(out)} == set(names)
    assert "Spearman" in result.stdout


@pytest.mark.slow
def test_criterion_all_runs_every_static_criterion(files, tmp_path):
    out = tmp_path / "all.csv"
    result = run("score", files[0], "-c", "all", "--out", out, *FAST_SENS)
    assert result.exit_code == 0, result.output
    assert [r["criterion"] for r in read(tmp_path / "all_spearman.csv")] == S.static_criteria()


def test_all_means_every_registered_static_criterion():
    names = S.static_criteria()
    assert {"l1", "dcs", "sensitivity"} <= set(names)
    assert names == [n for n in list_criteria() if not get_criterion(n).dynamic]
    assert "haste" not in names and "manidp" not in names


def test_plan_proxy_and_spearman_by_hand(tiny_vgg, example_input):
    from prune_cli.api import Context, Target
    from prune_cli.selection.plan import groups_in_scope
    from prune_cli.surgery import channel_groups

    groups = channel_groups(tiny_vgg, example_input)
    ctx = Context(tiny_vgg, tuple(groups_in_scope(groups)), tuple(groups), example_input, 10, Target())
    plan = Plan({"features.0": torch.tensor([1, 3])})
    proxy = correlations.channel_proxy(plan, ctx)
    assert proxy["features.0"][:4].tolist() == [0, 1, 0, 1] and int(proxy["features.4"].sum()) == 128
    a = {"g": torch.tensor([1.0, 2.0, 3.0, 4.0]), "h": torch.tensor([1.0, 1.0, 1.0])}
    b = {"g": torch.tensor([4.0, 3.0, 2.0, 1.0]), "h": torch.tensor([3.0, 2.0, 1.0])}
    m = correlations.spearman_matrix({"a": a, "b": b})
    assert m["a"]["b"] == pytest.approx(-1.0)  # group h has no ranking under a: left out
    assert isinstance(correlations.channel_proxy(Scores(a), ctx), dict)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--criterion", "l2norm"], "unknown criterion 'l2norm'"),
        (["--criterion", "haste"], "dynamic criterion"),
        (["--criterion", "l1", "--opt", "moed=greedy"], "did you mean 'mode'"),
        (["--criterion", "all", "--opt", "trials=1"], "criterion.name=value"),
        (["--criterion", "all", "--compare-checkpoint", "x.safetensors"], "name the criterion"),
        (["--criterion", "l1", "--target-macs", "0.97"], "most the constraints allow"),
    ],
)
def test_bad_requests_exit_2_with_one_line(files, tmp_path, args, message):
    out = tmp_path / "s.csv"
    result = run("score", files[0], "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_out_must_be_csv(files, tmp_path):
    result = run("score", files[0], "--out", tmp_path / "s.txt")
    assert result.exit_code == 2 and "--out must end in .csv" in result.stderr
