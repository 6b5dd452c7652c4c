"""`compare` with `latency_targets`: cells pruned to a measured-latency target, their records (the reduction each
reached), the equal-latency leaderboard next to the MACs one, `report` rebuilding it, and the refusals."""

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from helpers import train_digits_base, write_experiment
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.report import leaderboard as report
from prune_cli.run.experiment import config_key, load_experiment
from prune_cli.run.grid import latency_reached
from prune_cli.selection import latency as L

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def experiment(path: Path, **values) -> Path:
    spec = {"name": "tiny-latency", "criteria": ["l1", "similarity"], "targets": [], "latency_targets": [0.3],
            "latency_batch": 8, "seeds": [0], "finetune": {"epochs": 0}}  # fmt: skip
    return write_experiment(path, **{**spec, **values})


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """l1 (uses a latency target) and similarity (chooses its own widths) x one latency target (no MACs target:
    those cells are test_compare's)."""
    folder = tmp_path_factory.mktemp("latency-grid")
    base = train_digits_base(folder, epochs=1)
    exp = experiment(folder / "tiny.yaml", base={"file": str(base)}, out=str(folder / "out"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(L.CACHE_ENV, str(folder / "cache"))  # no latency table from the user's cache, none left there
        result = run("compare", exp)
    assert result.exit_code == 0, result.output
    return exp, folder / "out", result


def test_latency_cells_write_their_own_leaderboard(grid):
    _, out, result = grid
    for name in report.LATENCY_FILES:
        assert (out / name).stat().st_size > 0, name
    assert not any((out / name).exists() for name in report.LEADERBOARD_FILES)  # no MACs target, no MACs leaderboard
    lb = pd.read_csv(out / "leaderboard-latency.csv", keep_default_na=False, na_values=[""])
    assert sorted(lb["criterion"]) == ["l1", "similarity"] and (lb["latency_target"] == 0.3).all()
    assert (lb["latency_batch"] == 8).all()
    rows = lb.set_index("criterion")
    assert all(-1 < rows.loc[c, "latency_reached_mean"] < 1 for c in ("l1", "similarity"))
    # similarity ignores the target: listed, unranked, with the reason; l1 is ranked unless it fell short
    assert pd.isna(rows.loc["similarity", "rank"]) and "chooses its own widths" in rows.loc["similarity", "note"]
    l1 = rows.loc["l1"]
    assert bool(l1["met_target"]) == (l1["latency_reached_mean"] >= 0.3 - report.LATENCY_TOLERANCE)
    assert (l1["rank"] == 1) if l1["met_target"] else l1["note"].startswith("missed target")
    text = (out / "leaderboard-latency.md").read_text()
    assert "latency removed" in text and "chooses its own widths" in text and "-30% latency b8" in text
    assert "-30% latency b8" in result.stdout


def test_latency_records_carry_the_reduction_they_reached(grid):
    _, out, _ = grid
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    timed = [r for r in records if r["config"]["job"].get("target_latency")]
    assert len(records) == len(timed) == 2
    for r in timed:
        lt, b, a = r["latency_target"], r["before"], r["after"]
        assert r["metric"] == "latency" and lt["requested"] == 0.3 and lt["batch"] == 8
        assert lt["reached"] == pytest.approx(1 - a["latency_b8_ms"] / b["latency_b8_ms"])
        assert "latency_b1_ms" in a  # the experiment's own batch sizes are timed too
        assert lt["used"] == (r["criterion"] == "l1") == (r["target_report"]["metric"] == "latency")
        assert (lt["selection_reached"] is None) == (r["criterion"] == "similarity")
    assert report.leaderboard(report.runs(records)).empty  # never counted in the MACs leaderboard


def test_report_rebuilds_the_latency_leaderboard_from_records_alone(grid, tmp_path):
    _, out, _ = grid
    shutil.copytree(out / "records", tmp_path / "records")
    result = run("report", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "leaderboard-latency.csv").read_text() == (out / "leaderboard-latency.csv").read_text()


def test_a_record_left_untimed_reaches_nothing_until_it_is_timed():
    record = {
        "config": {"job": {"target_latency": 0.3, "latency_batch": 4}}, "before": {}, "after": {},
        "target_report": {"metric": "latency", "achieved": 0.29},
    }  # fmt: skip
    latency_reached(record)
    assert record["latency_target"]["reached"] is None and record["latency_target"]["selection_reached"] == 0.29
    record["before"]["latency_b4_ms"], record["after"]["latency_b4_ms"] = 2.0, 1.5
    latency_reached(record)
    assert math.isclose(record["latency_target"]["reached"], 0.25)


def test_latency_targets_leave_the_keys_of_the_macs_cells_alone():
    plain = load_experiment(ROOT / "experiments" / "quickstart.yaml")
    both = load_experiment(ROOT / "experiments" / "quickstart.yaml", {"latency_targets": "0.3,0.5"})
    keys = [config_key(c.config("digits", None, "x")) for c in plain.cells()]
    with_latency = [config_key(c.config("digits", None, "x")) for c in both.cells()]
    assert with_latency[: len(keys)] == keys
    extra = both.cells()[len(keys) :]
    assert len(extra) == len(plain.criteria) * len(both.latency_targets) * len(plain.seeds)
    assert {c.job.target_latency for c in extra} == {0.3, 0.5} and not set(with_latency[len(keys) :]) & set(keys)


@pytest.mark.parametrize(
    "values, args, message",
    [
        ({"latency_targets": [0]}, [], "`latency_targets` must be fractions in (0, 1)"),
        ({"latency_targets": [1.0]}, [], "`latency_targets` must be fractions in (0, 1)"),
        ({"latency_targets": [-0.2]}, [], "`latency_targets` must be fractions in (0, 1)"),
        ({}, ["--latency-targets", "0.3,1.5"], "`latency_targets` must be fractions in (0, 1)"),
        ({"latency_batch": 0}, [], "`latency_batch` must be a batch size >= 1"),
        ({"targets": [], "latency_targets": []}, [], "at least one target (or latency target)"),
    ],
)
def test_bad_latency_targets_exit_2_in_one_line(tmp_path, values, args, message):
    exp = experiment(tmp_path / "bad.yaml", base={"model": "resnet20"}, out=str(tmp_path / "out"), **values)
    result = run("compare", exp, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
