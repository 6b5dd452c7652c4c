"""Model files: round trip with identical outputs, shrunk widths rebuilt, and bad files refused with one line."""

import json

import pytest
import torch
from torch import nn

import models
from prune_cli.errors import BadModelFile, PruneCliError
from prune_cli.store.modelfile import load_model, load_weights, module_widths, read_metadata, resized, save_model


def _shrink(model: nn.Module, name: str, keep: int) -> None:
    """Hand-made pruning of one conv's outputs (and its BN and the next conv), for the loader to rebuild."""
    conv = model.get_submodule(f"{name}.conv1")
    bn = model.get_submodule(f"{name}.bn1")
    conv2 = model.get_submodule(f"{name}.conv2")
    new_conv, new_bn = resized(conv, conv.in_channels, keep), resized(bn, keep, keep)
    new_conv2 = resized(conv2, keep, conv2.out_channels)
    with torch.no_grad():
        new_conv.weight.copy_(conv.weight[:keep])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, attr).copy_(getattr(bn, attr)[:keep])
        new_conv2.weight.copy_(conv2.weight[:, :keep])
    block = model.get_submodule(name)
    block.conv1, block.bn1, block.conv2 = new_conv, new_bn, new_conv2


def test_round_trip_identical_outputs(tmp_path):
    model = models.create_model("resnet20", num_classes=10, in_channels=1).eval()
    path = save_model(model, tmp_path / "m.safetensors", dataset="digits", metrics={"top1": 0.5})
    loaded = load_model(path)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))
    arch, info = read_metadata(path)
    assert arch["factory"] == "resnet20" and info["dataset"] == "digits"


def test_pruned_widths_are_rebuilt_without_pickle(tmp_path):
    model = models.create_model("resnet20", num_classes=10).eval()
    _shrink(model, "layer1.0", 5)
    model.eval()
    path = save_model(model, tmp_path / "p.safetensors")
    loaded = load_model(path)
    assert loaded.layer1[0].conv1.out_channels == 5 and loaded.layer1[0].conv2.in_channels == 5
    assert module_widths(loaded) == module_widths(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert b"\x80\x04" not in path.read_bytes()[:64]  # safetensors header is JSON, not a pickle


def test_pickle_file_is_refused(tmp_path):
    model = models.create_model("resnet20")
    path = tmp_path / "m.pt"
    torch.save(model, path)
    with pytest.raises(BadModelFile, match="pickle"):
        load_model(path)


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    model = models.create_model("resnet20")
    path = save_model(model, tmp_path / "m.safetensors")
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadModelFile):
        load_model(corrupt)
    from safetensors.torch import save_file

    foreign = tmp_path / "f.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(BadModelFile, match="not a prune-cli model file"):
        load_model(foreign)
    with pytest.raises(BadModelFile, match="no model file"):
        load_model(tmp_path / "missing.safetensors")


def test_file_of_another_architecture_is_refused(tmp_path):
    """Metadata that claims one architecture but weights of another: one clear line, not a traceback."""
    from safetensors.torch import save_model as st_save

    vgg = models.create_model("vgg11")
    path = tmp_path / "x.safetensors"
    arch = {"factory": "resnet20", "kwargs": {}, "widths": {}, "dynamic": None}
    st_save(vgg, str(path), metadata={"prune_cli": "prune-cli/1", "arch": json.dumps(arch), "info": "{}"})
    with pytest.raises(BadModelFile, match="does not fit"):
        load_model(path)


def test_save_refuses_foreign_model_and_wrong_suffix(tmp_path):
    with pytest.raises(PruneCliError, match="not built by prune-cli"):
        save_model(nn.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(BadModelFile, match=".safetensors"):
        save_model(models.create_model("resnet20"), tmp_path / "m.pt")


def test_no_half_written_file_on_failure(tmp_path, monkeypatch):
    import prune_cli.store.modelfile as mf

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mf, "_st_save_model", boom)
    with pytest.raises(RuntimeError):
        save_model(models.create_model("resnet20"), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_load_user_weights(tmp_path):
    a, b = models.create_model("resnet20"), models.create_model("resnet20")
    torch.save(a.state_dict(), tmp_path / "w.pth")
    load_weights(b, tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a.eval()(x), b.eval()(x))
    with pytest.raises(BadModelFile):
        load_weights(models.create_model("vgg11"), tmp_path / "w.pth")
