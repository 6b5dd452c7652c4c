"""`prune-cli eval`: accuracy, parameters, MACs, latency and file size of a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


@O.grouped(run="latency_batches runtime seed trust_factory device threads json quiet")
def evaluate(
    model_file: Annotated[Path, typer.Argument(help="A .safetensors model file written by prune-cli.")],
    dataset: O.Dataset = None,
    data_dir: O.DataDir = None,
    split: O.Split = "test",
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Evaluate MODEL_FILE: top-1 (top-5 over 10 classes), params, MACs, latency (median, p10-p90), file size.

    The dataset defaults to the one the model was trained on (recorded in the file).
    """
    from prune_cli import engine, metrics
    from prune_cli.errors import BadValue
    from prune_cli.run import loading

    dev = run.setup()
    batches = run.batches()
    if split not in ("test", "val"):
        raise BadValue(f"--split must be test or val, got {split!r}")
    if run.runtime not in ("torch", "onnxruntime"):
        raise BadValue(f"--runtime must be torch or onnxruntime, got {run.runtime!r}")
    if run.runtime == "onnxruntime":
        from prune_cli.store.onnx import require_onnx

        require_onnx()  # before loading data
    net, dataset, splits = loading.load_model_and_data(
        model_file, dataset, data_dir, seed=run.seed, device=dev, trust=run.trust
    )
    result = engine.evaluate(net, getattr(splits, split), splits, device=dev)
    row = {
        "model_file": str(model_file),
        "dataset": dataset,
        "split": split,
        "top1": result.top1,
        "top5": result.top5,
        "loss": result.loss,
        "images": result.images,
        **metrics.measure(net, splits, latency_batches=batches, device=dev, runtime=run.runtime),
        "file_bytes": metrics.file_size(model_file),
    }
    if warning := metrics.busy_machine_warning(row):
        ui.warn(warning)
    if run.json:
        ui.print_json(row)
        return
    shown = dict(row)
    shown["params"] = ui.human(row["params"])
    shown["macs"] = ui.human(row["macs"])
    for b in batches:
        shown[f"latency_b{b}_ms"] = f"{row[f'latency_b{b}_ms']:.3f} ± {row.pop(f'latency_b{b}_spread_ms') / 2:.3f}"
        shown.pop(f"latency_b{b}_spread_ms", None)
    shown["file_bytes"] = ui.human(row["file_bytes"], "B")
    shown.pop("load_average", None)
    ui.table(shown, title=f"eval {model_file.name}")


def register(app: typer.Typer) -> None:
    app.command("eval")(ui.user_errors(evaluate))
