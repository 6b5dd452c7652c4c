"""`prune-cli train`: train a model from the zoo (or torchvision, or yours) on a dataset and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prune_cli.cli import options as O
from prune_cli.cli import ui


@O.grouped(run="seed device threads json quiet")
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
    save_every: Annotated[
        int,
        typer.Option(
            help="Also save the model every N epochs as OUT-epochK.safetensors (0: only the final model).",
            rich_help_panel=O.OUTPUT,
        ),
    ] = 0,
    run: O.RunOptions = O.RunOptions(),
) -> None:
    """Train MODEL on DATASET, evaluate on the test split, and save a .safetensors model file.

    A checkpoint (OUT.ckpt) is written after each epoch; --resume continues from it.
    """
    from prune_cli import engine
    from prune_cli.run import training
    from prune_cli.store.files import check_output

    if out.suffix != ".safetensors":
        raise_bad(f"--out must end in .safetensors, got {out.name!r}")
    if save_every < 0:
        raise_bad(f"--save-every must be >= 0, got {save_every}")
    # Every value and the output path are checked before the data are read, let alone a model trained.
    cfg = engine.TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,  # type: ignore[arg-type]
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, augment=not no_augment, compile=compile,
        seed=run.seed,
    )  # fmt: skip
    beside = [out.with_suffix(".ckpt").name] + ([training.snapshot_path(out, epochs).name] if save_every else [])
    check_output(out, also=beside)
    dev = run.setup()
    with ui.RichReporter() as reporter:
        summary = training.train_and_save(
            model, dataset, data_dir, cfg, out, weights=weights, device=dev, resume=resume, reporter=reporter,
            log=ui.info, save_every=save_every,
        )  # fmt: skip
    if run.json:
        ui.print_json({**summary, "out": str(out)})
    else:
        ui.table({**summary, "out": str(out)}, title="trained")


def raise_bad(message: str) -> None:
    from prune_cli.errors import BadValue

    raise BadValue(message)


def register(app: typer.Typer) -> None:
    app.command("train")(ui.user_errors(train))
