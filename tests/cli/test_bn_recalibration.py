"""BatchNorm re-estimation after removal (`prune --[no-]bn-recalibration`, `bn_recalibration:` in an experiment):
it reaches the pruned model, the run's summary, the record's key and the leaderboard's header, and the base is
measured under the same setting."""

import json
from pathlib import Path

import pytest
import torch
from helpers import randomise_bn
from torch import nn
from typer.testing import CliRunner

import models
from prune_cli.cli import app
from prune_cli.report import leaderboard as report
from prune_cli.run.experiment import config_key, load_experiment
from prune_cli.store.modelfile import load_model, save_model

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
RESNET20 = ROOT / "experiments/results/fmnist-resnet20/compare/records"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An untrained ResNet-20 for digits whose BatchNorm statistics are random: re-estimating them changes them."""
    torch.manual_seed(0)
    model = randomise_bn(models.create_model("resnet20", num_classes=10, in_channels=1))
    path = tmp_path_factory.mktemp("bn") / "base.safetensors"
    save_model(model, path, kind="trained", dataset="digits", input_shape=[1, 32, 32])
    return path


def _norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.fixture(scope="module")
def pruned(base, tmp_path_factory):
    """`prune --json` of the same base, same target, with and without re-estimation: (summary, model file) each."""
    folder = tmp_path_factory.mktemp("pruned")
    out = {}
    for name, flags in (("on", ()), ("off", ("--no-bn-recalibration",))):
        result = run("prune", base, "--target-macs", "0.5", "--latency-batches", "1", "--calib-images", "64",
                     "--out", folder / f"{name}.safetensors", "--json", *flags)  # fmt: skip
        assert result.exit_code == 0, result.output
        out[name] = json.loads(result.stdout), folder / f"{name}.safetensors"
    return out


def test_the_flag_decides_whether_batchnorm_statistics_are_re_estimated(base, pruned):
    (on, on_file), (off, off_file) = pruned["on"], pruned["off"]
    assert on["bn_recalibration"] is True and off["bn_recalibration"] is False
    assert on["after"]["bn_recalibrated_images"] > 0 and off["after"]["bn_recalibrated_images"] == 0
    # The base is measured under the same setting: re-estimated on the same images when the pruned model is.
    assert "top1_bn_recalibrated" in on["before"] and "top1_bn_recalibrated" not in off["before"]
    assert on["widths"] == off["widths"]  # l1 reads weights only: the same channels go in both runs

    original = _norms(load_model(base))
    for name, norm in _norms(load_model(off_file)).items():
        # Without re-estimation a pruned BatchNorm keeps the statistics of the channels it kept.
        assert torch.isin(norm.running_var, original[name].running_var).all(), name
    on_norms = _norms(load_model(on_file))
    changed = [n for n, m in on_norms.items() if not torch.isin(m.running_var, original[n].running_var).all()]
    assert len(changed) == len(on_norms)


def test_the_table_states_the_setting_and_gives_the_original_the_same_treatment(pruned, monkeypatch):
    from rich.console import Console

    from prune_cli.cli import prune, ui

    printed = {}
    for name, (summary, _) in pruned.items():
        monkeypatch.setattr(ui, "out", Console(record=True, width=200))
        prune.show(summary, (1,))
        printed[name] = ui.out.export_text()
    on, off = pruned["on"][0], pruned["off"][0]
    assert f"{on['before']['top1_bn_recalibrated']:.4f}" in printed["on"].split("before fine-tune")[0]
    assert "BatchNorm statistics re-estimated on" in printed["on"] and "for the original's" in printed["on"]
    assert f"{off['before']['top1']:.4f}" in printed["off"] and "not re-estimated" in printed["off"]


def test_bn_recalibration_reaches_the_job_and_its_key_and_the_default_keeps_old_keys():
    exp_file = ROOT / "experiments" / "fmnist-resnet20.yaml"
    records = [json.loads(p.read_text()) for p in RESNET20.glob("*.json")]
    digest = records[0]["config"]["base_sha256"]
    default = load_experiment(exp_file)
    assert all(c.job.recalibrate_bn for c in default.cells())
    keys = {config_key(c.config(default.dataset, default.data_dir, digest)) for c in default.cells()}
    assert {r["key"] for r in records} <= keys  # the committed records are found again, not run again

    off = load_experiment(exp_file, {"bn_recalibration": False})
    assert not any(c.job.recalibrate_bn for c in off.cells())
    assert not keys & {config_key(c.config(off.dataset, off.data_dir, digest)) for c in off.cells()}


def _records(recalibrate: bool | None = None, base_recalibrated: float | None = None) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(RESNET20.glob("*.json"))]
    records = [r for r in records if r["criterion"] == "l1"]
    for r in records:
        if recalibrate is not None:
            r["config"]["job"]["recalibrate_bn"] = recalibrate
        if base_recalibrated is not None:
            r["before"]["top1_bn_recalibrated"] = base_recalibrated
    return records


def test_the_leaderboard_header_states_the_setting():
    assert "re-estimated after removal on up to 2,048" in report.header(report.runs(_records()))
    assert "not re-estimated" in report.header(report.runs(_records(recalibrate=False)))
    mixed = _records()[:2] + _records(recalibrate=False)[2:]
    assert "on in 2 runs and off in" in report.header(report.runs(mixed))


def test_without_fine_tuning_drops_are_measured_from_the_base_re_estimated_the_same_way():
    plain = report.leaderboard(report.runs(_records()))
    df = report.runs(_records(base_recalibrated=0.5))
    same = report.leaderboard(df)
    assert (same["drop_pt"] == 100 * (0.5 - same["top1_mean"])).all()
    assert (same["drop_pt"] != plain["drop_pt"]).all()
    assert "reads 50.00%" in report.header(df)
