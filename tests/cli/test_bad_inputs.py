"""Bad inputs end in one `error:` line and exit code 2: no traceback, no new file, no changed file (issue 23).

One table: each case names a command line (placeholders {M} a model file, {RGB} / {MANY} image folders, {A255} a
name too long for the file system) and the files it finds in its working folder beforehand. Every case runs in an
empty folder; afterwards the folder must hold exactly what it held before, byte for byte (no output, no temporary
file, no changed file). The commands run in-process through Typer's runner, on an untrained resnet20 for digits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import models
from prune_cli.cli import app
from prune_cli.store.modelfile import save_model

runner = CliRunner()
LONG = "a" * 300  # longer than any file system's 255-byte name limit


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """{M}: an untrained resnet20 model file for digits (1x32x32, 10 classes); {RGB}: an image folder of RGB images
    (2 classes); {MANY}: one of grey images in 12 classes; {BAD}: a file that is not a model file."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    model = models.create_model("resnet20", num_classes=10, in_channels=1)
    save_model(model, root / "m.safetensors", dataset="digits", input_shape=[1, 32, 32])
    rng = np.random.default_rng(0)
    for name, classes, shape in (("rgb", 2, (8, 8, 3)), ("many", 12, (8, 8))):
        for c in range(classes):
            (root / name / f"c{c:02d}").mkdir(parents=True)
            for i in range(10):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / name / f"c{c:02d}/{i}.png")
    (root / "bad.safetensors").write_bytes(b"not a model file")
    return {"M": str(root / "m.safetensors"), "RGB": str(root / "rgb"), "MANY": str(root / "many"),
            "BAD": str(root / "bad.safetensors"), "A255": LONG}  # fmt: skip


# ------------------------------------------------------------------------------------------ files of a case
def folder(name: str) -> dict[str, bytes | None]:
    """A folder `name` (None content = folder)."""
    return {name: None}


def sinf_folder(manifest: object = None, corrupt: str | None = None, model: str = "{M}") -> dict[str, object]:
    """A SINF folder `sf/`: a manifest (default: a valid format tag only), the base model file, and the three
    tensor files (valid and empty), one of them replaced by garbage when `corrupt` names it."""
    manifest = {"format": "prune-cli-sinf/1"} if manifest is None else manifest
    files: dict[str, object] = {"sf": None, "sf/sinf.json": json.dumps(manifest).encode(), "sf/base.safetensors": model}
    for name in ("subgraphs", "router", "scores"):
        files[f"sf/{name}.safetensors"] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage" if name == corrupt else "EMPTY"
    return files


def experiment(text: str | bytes) -> dict[str, object]:
    return {"e.yaml": text.encode() if isinstance(text, str) else text}


EXP = "name: x\nbase: {file: m.safetensors}\ncriteria: [l1]\n"
BOMB = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["name: x", "base: {file: m.safetensors}", "criteria: [l1]", "notes: *a9"]
)

TRAIN = "train --epochs 1 --out t.safetensors"
PRUNE = "prune {M} --target-macs 0.3 --latency-batches 1"
CASES: list[tuple[str, str, dict[str, object], str]] = [
    # (id, command line, files beforehand, a part of the error message)
    # --- data that does not fit the model
    ("eval-rgb-data-for-grey-model", "eval {M} --dataset imagefolder --data-dir {RGB}", {}, "1-channel"),
    ("eval-more-classes-than-outputs", "eval {M} --dataset imagefolder --data-dir {MANY}", {}, "12 classes"),
    (
        "prune-rgb-data-for-grey-model",
        PRUNE + " --dataset imagefolder --data-dir {RGB} --out p.safetensors",
        {},
        "1-channel",
    ),
    ("prune-more-classes-than-outputs", PRUNE + " --dataset imagefolder --data-dir {MANY}", {}, "10 outputs"),
    ("score-rgb-data-for-grey-model", "score {M} --dataset imagefolder --data-dir {RGB} --out s.csv", {}, "1-channel"),
    (
        "score-more-classes-than-outputs",
        "score {M} --dataset imagefolder --data-dir {MANY} --out s.csv",
        {},
        "10 outputs",
    ),
    (
        "sinf-build-more-classes-than-outputs",
        "sinf build {M} --dataset imagefolder --data-dir {MANY} --out sf",
        {},
        "10 outputs",
    ),
    # --- output paths
    ("train-out-is-a-folder", TRAIN.replace("t.safetensors", "d.safetensors"), folder("d.safetensors"), "folder"),
    ("train-out-parent-is-a-file", TRAIN.replace("t.safetensors", "f/t.safetensors"), {"f": b"x"}, "not a folder"),
    ("train-out-name-too-long", TRAIN.replace("t.safetensors", "{A255}.safetensors"), {}, "bytes long"),
    ("prune-out-is-a-folder", PRUNE + " --out d.safetensors", folder("d.safetensors"), "folder"),
    ("prune-out-parent-is-a-file", PRUNE + " --out f/p.safetensors", {"f": b"x"}, "not a folder"),
    ("prune-out-name-too-long", PRUNE + " --out {A255}.safetensors", {}, "bytes long"),
    ("score-out-is-a-folder", "score {M} --out d.csv", folder("d.csv"), "folder"),
    ("score-out-parent-is-a-file", "score {M} --out f/s.csv", {"f": b"x"}, "not a folder"),
    ("score-out-name-too-long", "score {M} --out {A255}.csv", {}, "bytes long"),
    ("sinf-build-onto-a-file", "sinf build {M} --out f", {"f": b"x"}, "is a file"),
    ("sinf-build-out-name-too-long", "sinf build {M} --out {A255}", {}, "bytes long"),
    # --- values
    ("eval-seed-beyond-64-bits", "eval {M} --seed 36893488147419103232", {}, "--seed"),
    ("train-seed-beyond-64-bits", TRAIN + " --seed 36893488147419103232", {}, "--seed"),
    ("train-warmup-nan", TRAIN + " --warmup-epochs nan", {}, "warm-up"),
    ("train-warmup-negative", TRAIN + " --warmup-epochs -2", {}, "warm-up"),
    ("train-lr-inf", TRAIN + " --lr inf", {}, "learning rate"),
    ("train-weight-decay-negative", TRAIN + " --weight-decay -1", {}, "weight decay"),
    ("train-weight-decay-nan", TRAIN + " --weight-decay nan", {}, "weight decay"),
    ("train-batch-larger-than-the-training-set", TRAIN + " --batch-size 1000000", {}, "training images"),
    ("prune-lr-inf", PRUNE + " --finetune-epochs 1 --lr inf", {}, "learning rate"),
    ("eval-device-meta", "eval {M} --device meta", {}, "meta"),
    ("train-device-meta", TRAIN + " --device meta", {}, "meta"),
    ("eval-device-torch-lacks", "eval {M} --device xla", {}, "xla"),
    # --- SINF folders
    ("sinf-manifest-is-a-list", "sinf eval sf", sinf_folder(manifest=[1, 2]), "manifest"),
    ("sinf-manifest-not-json", "sinf eval sf", {**sinf_folder(), "sf/sinf.json": b"{nope"}, "JSON"),
    ("sinf-corrupt-subgraphs", "sinf eval sf", sinf_folder(corrupt="subgraphs"), "subgraphs.safetensors"),
    ("sinf-corrupt-router", "sinf eval sf", sinf_folder(corrupt="router"), "router.safetensors"),
    ("sinf-corrupt-scores", "sinf eval sf", sinf_folder(corrupt="scores"), "scores.safetensors"),
    (
        "sinf-manifest-widths-not-a-list",
        "sinf eval sf",
        sinf_folder({"format": "prune-cli-sinf/1", "cut": "relu", "clusters": [[0]], "widths": 7}),
        "do not fit",
    ),
    # --- experiment YAML
    ("yaml-not-utf8", "compare e.yaml", experiment(b"name: \xff\xfe\n" + EXP.encode()), "UTF-8"),
    ("yaml-targets-scalar", "compare e.yaml", experiment(EXP + "targets: 0.5\n"), "targets"),
    ("yaml-seeds-scalar", "compare e.yaml", experiment(EXP + "seeds: 3\n"), "seeds"),
    (
        "yaml-options-a-list",
        "compare e.yaml",
        experiment(EXP.replace("[l1]", "[{name: l1, options: [a, b]}]")),
        "options",
    ),
    ("yaml-latency-batches-zero", "compare e.yaml", experiment(EXP + "latency_batches: [1, 0]\n"), "latency_batches"),
    ("yaml-deep-nesting", "compare e.yaml", experiment(EXP + "notes: " + "[" * 3000 + "]" * 3000 + "\n"), "nesting"),
    (
        "yaml-duplicate-key",
        "compare e.yaml",
        experiment(EXP + "targets: [0.3]\ntargets: [0.5]\n"),
        "duplicate key 'targets' at line 5 (first at line 4)",
    ),
    ("yaml-latency-seconds-negative", "compare e.yaml", experiment(EXP + "latency_seconds: -1\n"), "latency_seconds"),
    ("yaml-billion-laughs", "compare e.yaml", experiment(BOMB), "more than 5,000 values"),
    ("yaml-seed-beyond-32-bits", "compare e.yaml", experiment(EXP + "seeds: [4294967296]\n"), "seeds"),
    # --- outputs destroyed or left behind: the scores would be written, then the comparison fails
    (
        "score-bad-compare-checkpoint-keeps-the-old-csv",
        "score {M} --compare-checkpoint {BAD} --out s.csv",
        {"s.csv": b"old scores\n"},
        "not a readable",
    ),
    (
        "score-bad-compare-checkpoint-writes-no-csv",
        "score {M} --compare-checkpoint {BAD} --out s.csv",
        {},
        "not a readable",
    ),
    (
        "score-uncomparable-criterion-keeps-the-old-csv",
        "score {M} -c l1 --compare-checkpoint {M} --out s.csv --calib-images 64",
        {"s.csv": b"old scores\n"},
        "sensitivities",
    ),
]


def snapshot(root: Path) -> dict[str, str | None]:
    """Every file and folder under `root` (hidden ones too): relative path -> sha256 of its bytes (None: folder)."""
    out: dict[str, str | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def make_files(root: Path, files: dict[str, object], assets: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif content == "EMPTY":
            save_file({}, str(path))
        elif isinstance(content, str):  # a copy of an asset
            path.write_bytes(Path(content.format(**assets)).read_bytes())
        else:
            path.write_bytes(content)  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "files", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line_exit_2_and_leaves_no_file(argv, files, message, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRUNE_CLI_DEBUG", raising=False)
    make_files(tmp_path, files, assets)
    before = snapshot(tmp_path)
    args = [a.format(**assets) for a in argv.split()] + ["--threads", "1"]
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no other exception escaped
    assert "Traceback" not in result.output
    assert lines and lines[-1].startswith("error: "), lines
    assert sum(line.startswith("error:") for line in lines) == 1, lines
    assert message in lines[-1], lines[-1]
    assert snapshot(tmp_path) == before  # nothing new (not even a temporary file), nothing changed


def test_every_case_has_its_own_id():
    ids = [c[0] for c in CASES]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)


def test_deferred_writes_leave_all_files_or_none(tmp_path):
    from prune_cli.store.files import deferred_writes, write_text

    (tmp_path / "a.csv").write_text("old")
    with pytest.raises(RuntimeError), deferred_writes():
        write_text(tmp_path / "a.csv", "new")
        write_text(tmp_path / "b.csv", "new")
        assert (tmp_path / "a.csv").read_text() == "old"  # nothing is renamed before the block ends
        raise RuntimeError("a later step fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"] and (tmp_path / "a.csv").read_text() == "old"
    with deferred_writes():
        write_text(tmp_path / "a.csv", "new")
        write_text(tmp_path / "b.csv", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text() == "new"


def test_an_output_gets_the_mode_a_plain_open_gives_it_or_keeps_its_own(tmp_path):
    from prune_cli.store.files import write_text

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "new.txt", "x")
        (tmp_path / "own.txt").write_text("x")
        (tmp_path / "own.txt").chmod(0o640)
        write_text(tmp_path / "own.txt", "y")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    assert (tmp_path / "own.txt").stat().st_mode & 0o777 == 0o640
