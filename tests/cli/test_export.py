"""`prune-cli export` and `--runtime onnxruntime`: a pruned model's ONNX file gives torch's predictions at any batch
size; a missing extra, a dynamic model and a bad name end in one line and leave existing files alone."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import randomise_bn
from typer.testing import CliRunner

import models
from prune_cli import surgery
from prune_cli.cli import app
from prune_cli.run import loading
from prune_cli.store.modelfile import load_model, save_model

pytest.importorskip("onnxruntime")
runner = CliRunner()


@pytest.fixture(scope="module")
def pruned_file(tmp_path_factory):
    """A ResNet-20 for digits with random weights and BatchNorm statistics, a third of its internal channels
    removed, saved as a pruned model file."""
    splits = loading.load_splits("digits", seed=0)
    x = loading.example_input(splits)
    torch.manual_seed(0)
    net = randomise_bn(models.create_model("resnet20", num_classes=10, in_channels=x.shape[1])).eval()
    groups = [g for g in surgery.channel_groups(net, x) if g.prunable and not g.residual]
    keep = {g.id: torch.arange(0, g.size, 3) for g in groups}
    pruned = surgery.prune(net, x, keep, groups=groups)
    path = tmp_path_factory.mktemp("export") / "p.safetensors"
    save_model(pruned, path, kind="pruned", dataset="digits", input_shape=list(x.shape[1:]),
               normalisation=loading.normalisation(splits))  # fmt: skip
    return path


def test_export_round_trip_gives_torch_predictions(pruned_file, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "p.onnx"
    result = runner.invoke(app, ["export", str(pruned_file), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["opset"] == 17 and row["images"] > 300
    assert row["equal_predictions"] == row["images"]
    model = load_model(pruned_file)
    assert any(type(m) is torch.nn.Conv2d and m.out_channels < 16 for m in model.modules())  # really pruned
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a dynamic batch axis
    for batch in (1, 5):
        x = torch.randn(batch, *row_shape(model))
        got = session.run(None, {"input": x.numpy()})[0]
        assert np.allclose(got, model(x).detach().numpy(), atol=1e-4)


def row_shape(model):
    return model.prune_cli_info["input_shape"]


def test_export_without_the_extra_names_it(pruned_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    out = tmp_path / "p.onnx"
    commands = [["export", str(pruned_file), "--out", str(out)], ["eval", str(pruned_file), "--runtime", "onnxruntime"]]
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "prune-cli[onnx]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("case", ["dynamic", "suffix"])
def test_refused_exports_leave_an_existing_file_alone(pruned_file, tmp_path, monkeypatch, case):
    out = tmp_path / ("p.onnx" if case == "dynamic" else "p.txt")
    out.write_text("keep me")
    if case == "dynamic":  # HASTE and ManiDP choose channels per input in Python: no ONNX graph records that
        monkeypatch.setattr("prune_cli.api.dynamic.is_dynamic", lambda m: True)
    result = runner.invoke(app, ["export", str(pruned_file), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert ("dynamic model" if case == "dynamic" else "must end in .onnx") in result.stderr
    assert out.read_text() == "keep me"


def test_eval_times_with_onnxruntime_and_says_so(pruned_file):
    result = runner.invoke(app, ["eval", str(pruned_file), "--runtime", "onnxruntime", "--latency-batches", "2",
                                 "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["runtime"] == "onnxruntime" and row["latency_b2_ms"] > 0
