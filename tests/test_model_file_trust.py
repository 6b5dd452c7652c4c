"""A model file never runs code: its factory is resolved only from the zoo, torchvision's classifiers, or a user
factory trusted on the command line for this run; its arguments and widths are checked as data.

Each crafted file names a function that would leave a trace (a sentinel file created, a victim file deleted) if it
ran; every command that reads a model file must refuse it with one line, exit 2, and leave no trace.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import models
from prune_cli.cli import app
from prune_cli.errors import BadModelFile
from prune_cli.store.modelfile import FORMAT, load_model, save_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def base_file(folder: Path) -> Path:
    """An untrained digits ResNet-20 file (no training: only loading is under test)."""
    path = folder / "base.safetensors"
    model = models.create_model("resnet20", num_classes=10, in_channels=1)
    save_model(model, path, kind="trained", dataset="digits", input_shape=[1, 8, 8])
    return path


def rewritten(src: Path, dst: Path, arch=None, info=None, tensors=None) -> Path:
    """`src` with its metadata (and optionally its tensors) replaced, as an attacker would write it."""
    meta = {"prune_cli": FORMAT}
    with open(src, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    old_arch, old_info = json.loads(header["arch"]), json.loads(header["info"])
    meta["arch"] = json.dumps(old_arch if arch is None else arch(old_arch) if callable(arch) else arch)
    meta["info"] = json.dumps(old_info if info is None else info(old_info) if callable(info) else info)
    state = load_file(str(src))
    save_file(tensors(state) if tensors else state, str(dst), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def traps(tmp_path_factory):
    """Crafted model files, each naming a factory that would leave a trace, and where the traces would appear."""
    d = tmp_path_factory.mktemp("traps")
    base = base_file(d)
    sentinel, victim = d / "SENTINEL", d / "victim.txt"
    victim.write_text("keep me")
    script = d / "payload.py"
    script.write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (d / "evil_on_import.py").write_text(f"open({str(sentinel)!r}, 'w').write('imported')\ndef build(**kw): pass\n")
    crafted = {
        "os:system": {"command": f"touch {sentinel}"},
        "subprocess:getoutput": {"cmd": f"touch {sentinel}"},
        "runpy:run_path": {"path_name": str(script)},
        "os:remove": {"path": str(victim)},
        "evil_on_import:build": {},
    }
    files = {}
    for i, (factory, kwargs) in enumerate(crafted.items()):
        arch = {"factory": factory, "kwargs": kwargs, "widths": {}, "dynamic": None}
        files[factory] = rewritten(base, d / f"trap{i}.safetensors", arch=arch)
    return d, files, sentinel, victim


def sinf_folder(d: Path, model_file: Path) -> Path:
    """A SINF folder whose base model file is `model_file` (loading reads the base first)."""
    from prune_cli.sinf.model import FORMAT as SINF_FORMAT

    folder = d / f"sinf-{model_file.stem}"
    folder.mkdir(exist_ok=True)
    (folder / "base.safetensors").write_bytes(model_file.read_bytes())
    for name in ("router", "subgraphs", "scores"):  # readable tensor files: only the base can stop the load
        save_file({"x": torch.zeros(1)}, str(folder / f"{name}.safetensors"))
    (folder / "sinf.json").write_text(json.dumps({"format": SINF_FORMAT}))
    return folder


def experiment(d: Path, base: dict) -> Path:
    path = d / f"exp-{len(list(d.glob('exp-*')))}.yaml"
    spec = {"name": "trap", "dataset": "digits", "base": base, "criteria": ["l1"], "targets": [0.3], "seeds": [0],
            "finetune": {"epochs": 0}, "latency_batches": [1], "out": str(d / "out")}  # fmt: skip
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


COMMANDS = {
    "info": lambda d, f: ["info", f],
    "eval": lambda d, f: ["eval", f, "--latency-batches", "1"],
    "prune": lambda d, f: ["prune", f, "--criterion", "l1", "--target-macs", "0.3", "--out", d / "p.safetensors"],
    "score": lambda d, f: ["score", f, "--criterion", "l1"],
    "sinf build": lambda d, f: ["sinf", "build", f, "--out", d / "sinf-out"],
    "sinf eval": lambda d, f: ["sinf", "eval", sinf_folder(d, f)],
    "compare --base": lambda d, f: ["compare", experiment(d, {"model": "resnet20"}), "--base", f],
    "compare base.file": lambda d, f: ["compare", experiment(d, {"file": str(f)})],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("factory", ["os:system", "subprocess:getoutput", "runpy:run_path", "os:remove",
                                     "evil_on_import:build"])  # fmt: skip
def test_a_crafted_factory_is_refused_and_never_runs(traps, command, factory, monkeypatch):
    d, files, sentinel, victim = traps
    monkeypatch.syspath_prepend(str(d))  # the module with side effects is importable: only the check stops it
    monkeypatch.chdir(d)
    result = run(*COMMANDS[command](d, files[factory]))
    assert result.exit_code == 2, result.output
    assert "--trust-factory" in result.stderr and factory in result.stderr
    lines = result.stderr.strip().splitlines()  # progress lines may come first; then one error line
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in result.output
    assert not sentinel.exists() and victim.read_text() == "keep me"
    assert "evil_on_import" not in sys.modules
    assert not (d / "p.safetensors").exists() and not (d / "sinf-out").exists() and not (d / "out").exists()


def test_an_experiment_base_model_is_a_factory_too(traps, monkeypatch):
    d, _, sentinel, _ = traps
    monkeypatch.syspath_prepend(str(d))
    result = run("compare", experiment(d, {"model": "evil_on_import:build", "epochs": 1}))
    assert result.exit_code == 2 and "--trust-factory evil_on_import:build" in result.stderr
    assert not sentinel.exists() and "evil_on_import" not in sys.modules


@pytest.fixture()
def user_factory_file(tmp_path, monkeypatch):
    """A model file built by a user's own factory (`my_zoo:tiny`), importable from the test's folder."""
    (tmp_path / "my_zoo.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes: int = 10, in_channels: int = 3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "tiny.safetensors"
    save_model(models.create_model("my_zoo:tiny", num_classes=10, in_channels=1), path, dataset="digits",
               input_shape=[1, 8, 8])  # fmt: skip
    return path


def test_a_user_factory_loads_only_when_trusted(user_factory_file):
    refused = run("info", user_factory_file)
    assert refused.exit_code == 2 and "--trust-factory my_zoo:tiny" in refused.stderr
    assert run("info", user_factory_file, "--trust-factory", "other:thing").exit_code == 2
    trusted = run("info", user_factory_file, "--trust-factory", "my_zoo:tiny", "--json")
    assert trusted.exit_code == 0, trusted.output
    assert json.loads(trusted.stdout)["factory"] == "my_zoo:tiny"
    evaluated = run("eval", user_factory_file, "--trust-factory", "my_zoo:tiny", "--latency-batches", "1", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    model = load_model(user_factory_file, trust=["my_zoo:tiny"])
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(BadModelFile, match="--trust-factory"):
        load_model(user_factory_file)


def _widths(change):
    def edit(arch):
        arch["widths"]["conv1"] = change(dict(arch["widths"]["conv1"]))
        return arch

    return edit


MALFORMED = {
    "architecture as a list": dict(arch=["resnet20"]),
    "no factory": dict(arch=lambda a: {k: v for k, v in a.items() if k != "factory"}),
    "kwargs as a list": dict(arch=lambda a: {**a, "kwargs": [10, 1]}),
    "negative size": dict(arch=lambda a: {**a, "kwargs": {"num_classes": -1, "in_channels": 1}}),
    "huge size": dict(arch=lambda a: {**a, "kwargs": {"num_classes": 10**12, "in_channels": 1}}),
    "size as a string": dict(arch=lambda a: {**a, "kwargs": {"num_classes": "10", "in_channels": 1}}),
    "unknown argument": dict(arch=lambda a: {**a, "kwargs": {"num_classes": 10, "depth": 1000}}),
    "widths wider than the factory's": dict(arch=_widths(lambda w: {**w, "out": 4096})),
    "widths that do not fit the weights": dict(arch=_widths(lambda w: {**w, "out": 8})),
    "negative width": dict(arch=_widths(lambda w: {**w, "out": -3})),
    "non-integer width": dict(arch=_widths(lambda w: {**w, "out": 7.5})),
    "widths not a mapping": dict(arch=lambda a: {**a, "widths": [1, 2, 3]}),
    "width spec not a mapping": dict(arch=lambda a: {**a, "widths": {"conv1": 16}}),
    "unknown layer type": dict(arch=_widths(lambda w: {**w, "type": "Embedding"})),
    "dynamic state not a mapping": dict(arch=lambda a: {**a, "dynamic": ["manidp"]}),
    "dynamic state malformed": dict(arch=lambda a: {**a, "dynamic": {"criterion": "manidp", "gates": "x"}}),
    "dynamic criterion unknown": dict(arch=lambda a: {**a, "dynamic": {"criterion": "os.system"}}),
    "info as a list": dict(info=["digits"]),
    "negative input shape": dict(info=lambda i: {**i, "input_shape": [1, -8, 8]}),
    "huge input shape": dict(info=lambda i: {**i, "input_shape": [3, 10**6, 10**6]}),
    "tensor shapes that do not fit": dict(tensors=lambda s: {**s, "conv1.weight": torch.zeros(16, 1, 5, 5)}),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("command", ["info", "eval"])
def test_malformed_metadata_is_one_line(case, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = rewritten(base_file(tmp_path), tmp_path / "bad.safetensors", **MALFORMED[case])
    before = sorted(tmp_path.iterdir())
    result = run(*COMMANDS[command](tmp_path, bad))
    assert result.exit_code == 2, (case, result.output, result.exception)
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert sorted(tmp_path.iterdir()) == before


def test_the_zoo_and_torchvision_need_no_trust(tmp_path):
    path = base_file(tmp_path)
    assert load_model(path)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    tv = tmp_path / "tv.safetensors"
    save_model(models.create_model("torchvision:resnet18", num_classes=10), tv, input_shape=[3, 32, 32])
    assert load_model(tv)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_a_trusted_factory_reaches_compare_worker_processes(user_factory_file, tmp_path):
    """`--trust-factory` holds in compare's worker processes (`--jobs 2`) and in its latency timing, not only in the
    driver's checks."""
    exp = experiment(tmp_path, {"file": str(user_factory_file)})
    spec = json.loads(exp.read_text())
    exp.write_text(json.dumps({**spec, "seeds": [0, 1], "latency_seconds": 0.05}))
    refused = run("compare", exp, "--jobs", "2")
    assert refused.exit_code == 2 and "--trust-factory my_zoo:tiny" in refused.stderr
    result = run("compare", exp, "--jobs", "2", "--trust-factory", "my_zoo:tiny")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "records").glob("*.json"))) == 2
