"""The CLI through Typer's runner (exit codes, stdout) and one real subprocess call of the console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from prune_cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "m.safetensors"
    result = run("train", "--model", "vgg11", "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
                 "--out", out, "--json", "--threads", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_train_writes_a_model_file_and_reports(trained):
    out, summary = trained
    assert out.exists() and not out.with_suffix(".ckpt").exists()
    assert 0 <= summary["test_top1"] <= 1 and summary["epochs"] == 1


def test_train_save_every_writes_the_runs_early_snapshots(tmp_path):
    from prune_cli.store.modelfile import load_model

    out = tmp_path / "m.safetensors"
    result = run("train", "--model", "resnet20", "--dataset", "digits", "--epochs", "2", "--batch-size", "256",
                 "--save-every", "1", "--out", out, "--threads", "2", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-epoch1.safetensors", "m.safetensors"]
    early, final = load_model(tmp_path / "m-epoch1.safetensors"), load_model(out)
    assert early.prune_cli_info["kind"] == "snapshot" and early.prune_cli_info["epoch"] == 1
    assert early.prune_cli_info["normalisation"] == final.prune_cli_info["normalisation"]
    assert len(early.prune_cli_info["history"]) == 1 and len(final.prune_cli_info["history"]) == 2
    assert not torch.equal(early.state_dict()["fc.weight"], final.state_dict()["fc.weight"])


def test_eval_json(trained):
    out, summary = trained
    result = run("eval", out, "--json", "--latency-batches", "1,4")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["top1"] == pytest.approx(summary["test_top1"])  # same data split, same model
    assert row["macs"] > 0 and row["params"] > 0 and row["latency_b4_ms"] > 0 and row["file_bytes"] > 1000


def test_the_model_file_records_its_input_normalisation(trained):
    from prune_cli.data import splits as D
    from prune_cli.run import loading
    from prune_cli.store.modelfile import load_model

    out, _ = trained
    recorded = load_model(out).prune_cli_info["normalisation"]
    assert recorded == loading.normalisation(loading.load_splits("digits", model_name="vgg11", seed=0))
    # another seed holds out other images, so its own statistics differ; the model's are used
    _, _, splits = loading.load_model_and_data(out, None, None, seed=3)
    own = D.make_splits(D.load_dataset("digits"), seed=3)
    assert own.mean != tuple(recorded["mean"])
    assert loading.normalisation(splits) == recorded


def test_eval_table_and_info(trained):
    out, _ = trained
    assert "top1" in run("eval", out, "--latency-batches", "1").stdout
    result = run("info", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["factory"] == "vgg11"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "resnet65", "--epochs", "0"], "did you mean 'resnet56'"),
        (["train", "--dataset", "fashion-mnst", "--epochs", "0"], "did you mean 'fashion-mnist'"),
        (["train", "--lr", "-1", "--epochs", "0"], "learning rate"),
        (["train", "--out", "m.pt", "--epochs", "0"], ".safetensors"),
        (["eval", "missing.safetensors"], "no model file"),
        (["list", "modles"], "did you mean 'models'"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent", "--epochs", "0"], "nonexistent"),
        (["train", "--model", "torchvision:inception_v3", "--epochs", "1"], "cannot run on (3, 32, 32) images"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_list_commands():
    assert "resnet56" in run("list", "models").stdout
    assert "digits" in run("list", "datasets").stdout


def test_console_script_subprocess(tmp_path):
    """The installed console script and `python -m prune_cli` both run and map errors to exit 2."""
    exe = Path(sys.executable).parent / "prune-cli"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and "prune-cli" in version.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "prune_cli", "eval", str(tmp_path / "nope.safetensors")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PRUNE_CLI_DEBUG": ""},
    )  # fmt: skip
    assert bad.returncode == 2 and "no model file" in bad.stderr and "Traceback" not in bad.stderr


def test_shadowing_package_is_detected(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-c", "from prune_cli.cli import main; main()", "--version"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "shadows" in proc.stderr


def test_help_does_not_import_torch():
    """`prune-cli --help` answers at once: neither the start-up check nor the commands' modules import torch."""
    code = (
        "import sys\nsys.argv = ['prune-cli', '--help']\nfrom prune_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "compare" in proc.stdout and "torch imported: False" in proc.stdout, proc.stdout + proc.stderr
