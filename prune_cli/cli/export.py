"""`prune-cli export`: a model file (base or pruned) as ONNX, checked against torch with ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


@O.grouped(run="seed trust_factory threads json quiet")
def export(
    model_file: Annotated[Path, typer.Argument(help="A .safetensors model file written by prune-cli.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The ONNX file to write.", rich_help_panel=O.OUTPUT)],
    check_images: Annotated[
        int,
        typer.Option(help="Test images on which ONNX Runtime's predictions are compared with torch's (0: none).",
                     rich_help_panel=O.OUTPUT),
    ] = 1000,
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    run: O.RunOptions = O.RunOptions(),
) -> None:  # fmt: skip
    """Export MODEL_FILE to ONNX (opset 17, dynamic batch axis: input (batch, C, H, W) -> logits (batch, classes)),
    then run it with ONNX Runtime on test images of the file's dataset and count the predictions equal to torch's.

    Needs the optional extra: pip install 'prune-cli\\[onnx]'. Example: prune-cli export p.safetensors --out p.onnx
    """
    from prune_cli.data import splits as D
    from prune_cli.errors import BadValue
    from prune_cli.run import loading
    from prune_cli.store import onnx as E
    from prune_cli.store.files import atomic_write, check_output

    E.require_onnx()
    if out.suffix != ".onnx":
        raise BadValue(f"--out must end in .onnx, got {out.name!r}")
    if check_images < 0:
        raise BadValue(f"--check-images must be >= 0, got {check_images}")
    check_output(out)
    run.setup("cpu")
    net, dataset, splits = loading.load_model_and_data(
        model_file, dataset, data_dir, seed=run.seed, device="cpu", trust=run.trust
    )
    data = E.to_onnx(net, loading.example_input(splits))
    ui.info(f"exported to ONNX (opset {E.OPSET}, TorchScript exporter, dynamic batch axis); checking with ONNX Runtime")
    row = {"model_file": str(model_file), "out": str(out), "opset": E.OPSET, "bytes": len(data), "dataset": dataset}
    if check_images:
        x = D.to_float(splits.test.x[:check_images], splits)
        row.update(E.agreement(net, E.session(data), x))
    with atomic_write(out) as tmp:  # after the check: a file that does not run is not written over a good one
        tmp.write_bytes(data)
    if check_images and row["equal_predictions"] < row["images"] * 0.999:
        ui.warn(f"ONNX Runtime and torch disagree on {row['images'] - row['equal_predictions']} of {row['images']} "
                "test images (more than 1 in 1,000)")  # fmt: skip
    if run.json:
        ui.print_json(row)
        return
    shown = dict(row)
    shown["bytes"] = ui.human(row["bytes"], "B")
    if check_images:
        shown["equal_predictions"] = f"{row['equal_predictions']} of {row['images']} test images"
        shown.pop("images")
    ui.table(shown, title=f"export {model_file.name}")


def register(app: typer.Typer) -> None:
    app.command("export")(ui.user_errors(export))
