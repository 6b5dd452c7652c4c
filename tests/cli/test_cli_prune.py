"""`prune-cli prune` end to end on digits: the table, the model file, and refusals that write nothing."""

import json

import pytest
from helpers import train_digits_base
from typer.testing import CliRunner

from prune_cli.cli import app
from prune_cli.metrics import count_macs
from prune_cli.store.modelfile import load_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_digits_base(tmp_path_factory.mktemp("prune"), epochs=2)


def test_prune_l1_end_to_end(base, tmp_path):
    out = tmp_path / "p.safetensors"
    result = run("prune", base, "--criterion", "l1", "--target-macs", "0.4", "--finetune-epochs", "1",
                 "--latency-batches", "1,8", "--out", out, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    report = summary["target_report"]
    assert report["requested"] == 0.4 and 0.4 <= report["achieved"] < 0.45
    pruned = load_model(out)
    import torch

    x = torch.zeros(1, 1, 32, 32)
    assert count_macs(pruned, x) == summary["after"]["macs"]
    assert summary["after"]["macs"] == pytest.approx(summary["before"]["macs"] * (1 - report["achieved"]), rel=1e-6)
    assert 0 <= summary["after"]["top1_before_finetune"] <= 1 and summary["after"]["latency_b8_ms"] > 0
    table = run("info", out)
    assert table.exit_code == 0 and "pruned layers" in table.stdout


def test_prune_table_output(base):
    result = run("prune", base, "--target-params", "0.3", "--opt", "mode=greedy", "--latency-batches", "1")
    assert result.exit_code == 0, result.output
    assert "requested 0.300" in result.stdout and "MACs" in result.stdout


def test_prune_with_fast_widths(base):
    result = run("prune", base, "--target-macs", "0.4", "--scope", "all", "--fast-widths", "8", "--latency-batches",
                 "8", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["target_report"]["achieved"] >= 0.4 and summary["after"]["latency_b8_ms"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--criterion", "l2norm", "--target-macs", "0.5"], "unknown criterion 'l2norm'"),
        (["--target-macs", "0.97"], "most the constraints allow"),
        (["--target-macs", "0.5", "--opt", "moed=greedy"], "did you mean 'mode'"),
        (["--target-macs", "0.5", "--opt", "mode=lazy"], "must be one of"),
        (["--target-macs", "1.5"], "reduction must be in"),
        (["--target-macs", "0.5", "--fast-widths", "-1"], "fast-widths must be >= 0"),
        ([], "exactly one of --target-macs, --target-params or --target-latency"),
    ],
)
def test_bad_prune_requests_exit_2_and_write_nothing(base, tmp_path, args, message):
    out = tmp_path / "p.safetensors"
    result = run("prune", base, "--out", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
