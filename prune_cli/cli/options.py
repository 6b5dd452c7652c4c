"""Shared option aliases, so that a flag has the same name and help in every command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DATA = "Data"
TRAIN = "Training"
PRUNE = "Pruning"
OUTPUT = "Output"
RUN = "Run"

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Zoo name (`prune-cli list models`), torchvision:NAME or package.module:factory."
    ),
]
Weights = Annotated[Path | None, typer.Option("--weights", help="Initial weights (.safetensors or a .pt state dict).")]
Dataset = Annotated[
    str | None,
    typer.Option("--dataset", "-d", help="Dataset name (see `prune-cli list datasets`).", rich_help_panel=DATA),
]
DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder holding the dataset files.", rich_help_panel=DATA)
]
Seed = Annotated[int, typer.Option("--seed", help="Seed for splits, initialisation and sampling.", rich_help_panel=RUN)]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if available).", rich_help_panel=RUN)
]
Threads = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).", rich_help_panel=RUN)
]
Epochs = Annotated[int, typer.Option("--epochs", help="Training epochs.", rich_help_panel=TRAIN)]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Training batch size.", rich_help_panel=TRAIN)]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine schedule).", rich_help_panel=TRAIN)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.", rich_help_panel=OUTPUT)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only results, no progress or messages.")]
OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output model file (.safetensors).", rich_help_panel=OUTPUT)]
LatencyBatches = Annotated[
    str, typer.Option("--latency-batches", help="Batch sizes for latency, comma separated.", rich_help_panel=OUTPUT)
]

# Pruning: the same flags for `prune` and `score`.
TargetMacs = Annotated[
    float | None, typer.Option(help="Fraction of MACs to remove (0.5 = half).", rich_help_panel=PRUNE)
]
TargetParams = Annotated[float | None, typer.Option(help="Fraction of parameters to remove.", rich_help_panel=PRUNE)]
Mode = Annotated[str, typer.Option(help="uniform or global selection.", rich_help_panel=PRUNE)]
Scope = Annotated[str, typer.Option(help="internal or all (ResNet residual groups).", rich_help_panel=PRUNE)]
RoundTo = Annotated[int, typer.Option(help="Keep a multiple of this many channels.", rich_help_panel=PRUNE)]
FastWidths = Annotated[
    int,
    typer.Option(
        help="Round each group down to a width that runs faster than every wider one on this machine at this batch "
        "size; the other groups are pruned less to meet the target (times every layer: seconds to a minute; 0: off).",
        rich_help_panel=PRUNE,
    ),
]
TargetLatency = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the measured latency to remove on this device at --latency-batch (0.3 = 30% faster "
        "forward passes); instead of --target-macs/--target-params. Times every layer at candidate widths (cached).",
        rich_help_panel=PRUNE,
    ),
]
LatencyBatch = Annotated[
    int, typer.Option(help="Batch size at which --target-latency is timed and met.", rich_help_panel=PRUNE)
]
Runtime = Annotated[
    str,
    typer.Option(
        help="What latency is timed with: torch or onnxruntime (needs the extra: pip install 'prune-cli\\[onnx]').",
        rich_help_panel=OUTPUT,
    ),
]
MaxRatio = Annotated[float, typer.Option(help="Most a group may lose.", rich_help_panel=PRUNE)]
TrustFactory = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-factory",
        help="Let a model file be built by this package.module:factory of yours: it is imported and run, so name only "
        "code you trust (repeatable). Without it a file may name only a zoo model or a torchvision classifier.",
        rich_help_panel=RUN,
    ),
]
CalibImages = Annotated[int, typer.Option(help="Calibration images for scoring.", rich_help_panel=PRUNE)]
BnRecalibration = Annotated[
    bool,
    typer.Option(
        "--bn-recalibration/--no-bn-recalibration",
        help="Re-estimate BatchNorm statistics on 2,048 training images after removal (static criteria); the "
        "original's top-1 is then also given with its statistics re-estimated on the same images.",
        rich_help_panel=PRUNE,
    ),
]
