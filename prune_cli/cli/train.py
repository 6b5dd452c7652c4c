"""`prune-cli train`: train a model from the zoo (or torchvision, or yours) on a dataset and save it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


def train(
    model: O.Model = "resnet20",
    dataset: O.Dataset = "digits",
    out: O.OutFile = Path("model.safetensors"),
    data_dir: O.DataDir = None,
    weights: O.Weights = None,
    epochs: O.Epochs = 30,
    batch_size: O.BatchSize = 128,
    lr: O.Lr = 0.1,
    optimizer: Annotated[str, typer.Option(help="sgd (nesterov) or adamw.", rich_help_panel=O.TRAIN)] = "sgd",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=O.TRAIN)] = 5e-4,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up epochs.", rich_help_panel=O.TRAIN)] = 1.0,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing.", rich_help_panel=O.TRAIN)] = 0.0,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="No crop/flip.", rich_help_panel=O.TRAIN)] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the model.", rich_help_panel=O.TRAIN)] = False,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's checkpoint.", rich_help_panel=O.TRAIN)] = False,
    seed: O.Seed = 0,
    device: O.Device = None,
    threads: O.Threads = None,
    json: O.Json = False,
    quiet: O.Quiet = False,
) -> None:
    """Train MODEL on DATASET, evaluate on the test split, and save a .safetensors model file.

    A checkpoint (OUT.ckpt) is written after each epoch; --resume continues from it.
    """
    from prune_cli import engine, pipeline
    from prune_cli.modelfile import save_model

    ui.quiet = quiet
    dev = pipeline.setup_runtime(device, threads, seed)
    if out.suffix != ".safetensors":
        raise_bad(f"--out must end in .safetensors, got {out.name!r}")
    cfg = engine.TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,  # type: ignore[arg-type]
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, augment=not no_augment, compile=compile,
        seed=seed,
    )  # fmt: skip
    splits = pipeline.load_splits(dataset, data_dir, model_name=model, seed=seed)
    net = pipeline.new_model(model, splits, weights)
    ui.info(f"training {model} on {dataset} ({len(splits.train)} train / {len(splits.val)} val images) on {dev}")
    checkpoint = out.with_suffix(".ckpt")
    t0 = time.perf_counter()
    with ui.RichReporter() as reporter:
        result = engine.train(
            net, splits, cfg, device=dev, checkpoint=checkpoint, resume=resume, reporter=reporter, log=ui.info
        )
    test = engine.evaluate(net, splits.test, splits, device=dev)
    summary = {
        "model": model,
        "dataset": dataset,
        "test_top1": test.top1,
        "test_top5": test.top5,
        "val_top1": result.history[-1].get("val_acc") if result.history else None,
        "epochs": epochs,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - t0,
        "images_per_second": result.images_per_second if result.history else None,
    }
    save_model(
        net.cpu(), out, kind="trained", dataset=dataset, input_shape=list(splits.train.x.shape[1:]),
        data_dir=str(data_dir) if data_dir else None, seed=seed, train=engine.config_dict(cfg),
        history=result.history, metrics=summary, machine=pipeline.machine(),
    )  # fmt: skip
    checkpoint.unlink(missing_ok=True)
    if json:
        ui.print_json({**summary, "out": str(out)})
    else:
        ui.table({**summary, "out": str(out)}, title="trained")


def raise_bad(message: str) -> None:
    from prune_cli.errors import BadValue

    raise BadValue(message)


def register(app: typer.Typer) -> None:
    app.command("train")(ui.user_errors(train))
